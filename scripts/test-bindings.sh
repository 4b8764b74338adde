#!/usr/bin/env bash
# The bindings and packaging checks (scripts/test-all.sh's "bindings" phase):
#   - scripts/install.sh into a temporary prefix (target/debug's library: the one `cargo test`
#     built, so nothing is compiled twice), then a C program built through
#     `pkg-config --cflags --libs hdb` (shared, and `--static`) and a CMake project through
#     find_package(hdb) (hdb::hdb, hdb::hdb_static, the C++ wrapper), all run;
#   - include/hdb.hpp's test under ASan/UBSan, with exceptions and with -fno-exceptions
#     -DHDB_NO_EXCEPTIONS;
#   - each binding under bindings/ with the toolchain this machine has (see its README);
#   - the README's examples, compiled and run (the Unreal one compiled only).
# Every program runs on the tiny fixtures of tests/fixtures.
#
# Usage: scripts/test-bindings.sh [step ...]   (default: every step; steps: packaging hpp go
#        python csharp swift unreal readme; readme needs python's venv)
# Env: KEEP=1 keeps the temporary directory; CC, CXX.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fixtures="$root/tests/fixtures"
cc="${CC:-cc}"
cxx="${CXX:-c++}"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(packaging hpp go python csharp swift unreal readme)

work="$(mktemp -d "${TMPDIR:-/tmp}/hdb-bindings.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then echo "(keeping $work)"; else trap 'rm -rf "$work"' EXIT; fi
say() { echo "-- bindings: $*"; }

prefix="$work/prefix"
say "scripts/install.sh --debug $prefix"
scripts/install.sh --debug "$prefix" >/dev/null
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Go 1.19's build cache does not key a cgo package on pkg-config's output, so a package built
# against an earlier (deleted) prefix would link with its stale -L; the CGO_* variables are
# part of the key, so naming the prefix there keeps each run's build its own.
export CGO_CFLAGS="-I$prefix/include" CGO_LDFLAGS="-L$prefix/lib"

step_packaging() {
  local src="$root/bindings/tests/packaging"
  [[ -L "$prefix/lib/libhdb.so" && -f "$prefix/lib/libhdb.so.$(hdb_abi)" ]] || { echo "no SONAME link" >&2; return 1; }
  # Only hdb_* symbols leave the static library.
  local stray
  stray="$(nm -g --defined-only "$prefix/lib/libhdb.a" 2>/dev/null | awk 'NF == 3 && $3 !~ /^hdb_/' | head -5)"
  [[ -z "$stray" ]] || { echo "libhdb.a exports non-hdb symbols:"$'\n'"$stray" >&2; return 1; }
  say "pkg-config consumer (shared)"
  # shellcheck disable=SC2046
  "$cc" -std=c11 -Wall -Werror "$src/consumer.c" $(pkg-config --cflags --libs hdb) -o "$work/pc_shared"
  "$work/pc_shared" "$fixtures/tiny-sd"
  say "pkg-config consumer (static)"
  # shellcheck disable=SC2046
  "$cc" -std=c11 -Wall -Werror "$src/consumer.c" $(pkg-config --static --cflags hdb) \
    "$prefix/lib/libhdb.a" $(pkg-config --static --libs-only-l hdb | sed 's/-lhdb//') -o "$work/pc_static"
  ldd "$work/pc_static" | grep -q libhdb && { echo "the static consumer needs libhdb.so" >&2; return 1; }
  env -u LD_LIBRARY_PATH "$work/pc_static" "$fixtures/tiny-sd"
  say "CMake consumer (find_package(hdb))"
  cmake -S "$src" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build "$work/cmake" >/dev/null
  # CMake links imported shared libraries with an rpath: no LD_LIBRARY_PATH needed.
  env -u LD_LIBRARY_PATH "$work/cmake/consumer_shared" "$fixtures/tiny-sd"
  env -u LD_LIBRARY_PATH "$work/cmake/consumer_static" "$fixtures/tiny-sd"
  env -u LD_LIBRARY_PATH "$work/cmake/consumer_cpp" "$fixtures/tiny-sd"
}

hdb_abi() { sed -n 's/^#define HDB_ABI_VERSION \([0-9]*\)$/\1/p' "$root/include/hdb.h"; }

step_hpp() {
  local san=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g)
  local common=(-std=c++17 -Wall -Wextra -Werror -I"$prefix/include" "$root/bindings/tests/cpp/hpp_test.cpp"
    -L"$prefix/lib" -lhdb -Wl,-rpath,"$prefix/lib")
  say "hdb.hpp with exceptions (ASan/UBSan)"
  "$cxx" "${san[@]}" "${common[@]}" -o "$work/hpp_exc"
  "$work/hpp_exc" "$fixtures" | tail -1
  say "hdb.hpp with -fno-exceptions -DHDB_NO_EXCEPTIONS (ASan/UBSan)"
  "$cxx" "${san[@]}" -fno-exceptions -DHDB_NO_EXCEPTIONS "${common[@]}" -o "$work/hpp_noexc"
  "$work/hpp_noexc" "$fixtures" | tail -1
}

step_go() {
  say "go vet + go test -race (bindings/go)"
  ( cd bindings/go
    [[ -z "$(gofmt -l .)" ]] || { echo "gofmt: $(gofmt -l .)" >&2; exit 1; }
    # No dependencies outside the standard library: nothing is downloaded.
    GOFLAGS=-mod=mod GOPROXY=off go vet ./...
    # The race detector watches the tests that fail and cancel from many goroutines at once.
    GOFLAGS=-mod=mod GOPROXY=off go test -race -count=1 ./... )
}

step_python() {
  # A venv under the target dir with the pinned test requirements (created once), the package
  # pip-installed from bindings/python with the installed library bundled into it.
  local venv="${CARGO_TARGET_DIR:-$root/target}/bindings-venv"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r bindings/python/requirements-test.txt
  say "pip install bindings/python + pytest"
  # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
  cp -r bindings/python "$work/python-src"
  rm -rf "$work/python-src/build" "$work/python-src/"*.egg-info
  HDB_LIBRARY="$prefix/lib/libhdb.so.$(hdb_abi)" "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps --force-reinstall "$work/python-src"
  # From outside the source tree, so the installed package (with its bundled library) is tested.
  ( cd "$work" && env -u LD_LIBRARY_PATH "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      "$root/bindings/python/tests" )
}

step_csharp() {
  say "C# (bindings/csharp): mcs + mono console test, Unity sample against stubs"
  local cs=bindings/csharp
  mcs -nologo -warnaserror -out:"$work/ConsoleTest.exe" "$cs"/Runtime/*.cs "$cs/Tests/ConsoleTest.cs"
  mcs -nologo -warnaserror -target:library -out:"$work/Sample.dll" "$cs"/Runtime/*.cs \
    "$cs/Tests/UnityStubs.cs" "$cs/Samples~/Example/HdbExample.cs"
  # mono resolves DllImport("hdb") to libhdb.so on LD_LIBRARY_PATH (the installed prefix).
  mono "$work/ConsoleTest.exe" "$fixtures" | tail -1
}

step_unreal() {
  say "Unreal plugin C++ (-fno-exceptions -fno-rtti, engine stubs; clang, and g++ with ASan/UBSan)"
  local u=bindings/unreal
  local flags=(-std=c++17 -fno-exceptions -fno-rtti -DHDB_NO_EXCEPTIONS=1 -Wall -Wextra -Werror
    -I"$u/Tests/stubs" -I"$prefix/include" -I"$u/Hdb/Source/HdbRuntime/Public")
  local srcs=("$u"/Hdb/Source/HdbRuntime/Private/*.cpp "$u/Tests/unreal_driver.cpp")
  # Unreal's own compiler on Linux is clang: its diagnostics first.
  clang++ "${flags[@]}" -fsyntax-only "${srcs[@]}"
  # The sanitized run with the C++ compiler whose runtimes CI installs (clang's are only
  # "recommended" by Debian's clang); vptr checks need RTTI, which Unreal modules lack.
  "$cxx" "${flags[@]}" -fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=all -g \
    "${srcs[@]}" -L"$prefix/lib" -lhdb -Wl,-rpath,"$prefix/lib" -o "$work/unreal_driver"
  "$work/unreal_driver" "$fixtures" 2>/dev/null | tail -1
}

step_swift() {
  # No Swift toolchain here: clang builds the CHdb module from the package's module map.
  say "Swift: CHdb module map through clang -fmodules (the Swift layer is not compiled here)"
  local sw=bindings/swift
  clang -x objective-c -fmodules -fmodules-cache-path="$work/modules" \
    -fmodule-map-file="$sw/Sources/CHdb/module.modulemap" -I"$prefix/include" -Wall -Werror \
    -fsyntax-only "$sw/Tests/modulemap/check.m"
}

# The README's examples: the fenced block after each `<!-- readme-example: NAME -->` line.
readme_example() {
  awk -v name="$1" '
    $0 == "<!-- readme-example: " name " -->" { found = 1; next }
    found == 1 && /^```/ { found = 2; next }
    found == 2 && /^```/ { exit }
    found == 2 { print }
  ' README.md
}

# Writes README example NAME to FILE; an empty one (a renamed marker) fails.
extract() {
  readme_example "$1" > "$2"
  [[ -s "$2" ]] || { echo "README.md has no example '$1'" >&2; return 1; }
}

step_readme() {
  say "README examples (C++, Go, Python, C#, Unreal)"
  local ex="$work/readme" tiny="$fixtures/tiny-sd"
  mkdir -p "$ex/go"
  extract cpp "$ex/example.cpp"
  # shellcheck disable=SC2046
  "$cxx" -std=c++17 -Wall -Werror "$ex/example.cpp" $(pkg-config --cflags --libs hdb) -o "$ex/cpp"
  "$ex/cpp" "$tiny"
  extract go "$ex/go/main.go"
  printf 'module example\n\ngo 1.19\n\nrequire hdb v0.0.0\n\nreplace hdb => %s\n' "$root/bindings/go" > "$ex/go/go.mod"
  ( cd "$ex/go" && GOFLAGS=-mod=mod GOPROXY=off go run . "$tiny" )
  extract python "$ex/example.py"
  ( cd "$ex" && env -u LD_LIBRARY_PATH "${CARGO_TARGET_DIR:-$root/target}/bindings-venv/bin/python" example.py "$tiny" )
  extract csharp "$ex/Example.cs"
  mcs -nologo -warnaserror -out:"$ex/Example.exe" bindings/csharp/Runtime/*.cs "$ex/Example.cs"
  mono "$ex/Example.exe" "$tiny"
  extract unreal "$ex/unreal.cpp"
  clang++ -std=c++17 -fno-exceptions -fno-rtti -DHDB_NO_EXCEPTIONS=1 -Wall -Werror -fsyntax-only \
    -Ibindings/unreal/Tests/stubs -I"$prefix/include" -Ibindings/unreal/Hdb/Source/HdbRuntime/Public "$ex/unreal.cpp"
}

for s in "${steps[@]}"; do
  declare -F "step_$s" >/dev/null || { echo "test-bindings: unknown step $s" >&2; exit 2; }
  "step_$s"
done
say "every step passed (${steps[*]})"

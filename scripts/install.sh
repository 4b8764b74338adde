#!/usr/bin/env bash
# Builds libhdb and installs it where C, C++ and build systems find it:
#   PREFIX/lib/libhdb.so.<abi>            the shared library (its SONAME)
#   PREFIX/lib/libhdb.so -> libhdb.so.<abi>  for `-lhdb` at link time
#   PREFIX/lib/libhdb.a                   the static library, exporting only hdb_* symbols
#   PREFIX/include/hdb.h, hdb.hpp         the C API and its C++17 wrapper
#   PREFIX/lib/pkgconfig/hdb.pc           `pkg-config --cflags --libs hdb` (--static adds the
#                                         system libraries the static library needs)
#   PREFIX/lib/cmake/hdb/                 `find_package(hdb)`: targets hdb::hdb (shared) and
#                                         hdb::hdb_static
#
# Usage: scripts/install.sh [--debug] [--no-build] PREFIX
#   --debug     install target/debug's library (what `cargo test` built; CI uses it) instead
#               of building and installing the release one.
#   --no-build  install what is already built.
# Env: CARGO_TARGET_DIR, CARGO_FLAGS (extra flags for `cargo build`, e.g.
#      "--no-default-features --features avx512" for a CPU-only library).
#
# A plain script rather than cargo-c: cargo-c is a cargo subcommand that compiles cargo
# itself (several hundred crates, long on the 2-core CI machine) to do what these few lines
# do, and build.rs already sets the SONAME it would set.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=release
build=1
prefix=
for a in "$@"; do
  case "$a" in
    --debug) profile=debug ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $a" >&2; exit 2 ;;
    *) [[ -z "$prefix" ]] || { echo "install.sh: one PREFIX only" >&2; exit 2; }; prefix="$a" ;;
  esac
done
[[ -n "$prefix" ]] || { echo "usage: scripts/install.sh [--debug] [--no-build] PREFIX" >&2; exit 2; }
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
cd "$root"

if [[ $build == 1 ]]; then
  flags=(--lib)
  [[ $profile == release ]] && flags+=(--release)
  # shellcheck disable=SC2086
  cargo build "${flags[@]}" ${CARGO_FLAGS:-}
fi
out="${CARGO_TARGET_DIR:-$root/target}/$profile"
for f in libhdb.so libhdb.a; do
  [[ -f "$out/$f" ]] || { echo "install.sh: $out/$f is missing (build it first)" >&2; exit 1; }
done

# Versions come from the sources the library was built from.
abi="$(sed -n 's/^#define HDB_ABI_VERSION \([0-9]*\)$/\1/p' include/hdb.h)"
version="$(sed -n 's/^#define HDB_VERSION_STRING "\(.*\)"$/\1/p' include/hdb.h)"
[[ -n "$abi" && -n "$version" ]] || { echo "install.sh: no version in include/hdb.h" >&2; exit 1; }
soname="$(readelf -d "$out/libhdb.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')"
[[ "$soname" == "libhdb.so.$abi" ]] ||
  { echo "install.sh: $out/libhdb.so has SONAME '$soname', expected libhdb.so.$abi" >&2; exit 1; }

lib="$prefix/lib"
mkdir -p "$lib/pkgconfig" "$lib/cmake/hdb" "$prefix/include"
install -m 755 "$out/libhdb.so" "$lib/libhdb.so.$abi"
ln -sf "libhdb.so.$abi" "$lib/libhdb.so"

# The static library: one relocatable object whose only global symbols are the hdb_*
# functions (a Rust staticlib exports thousands of Rust and compiler-builtins symbols that
# could clash with another Rust library in the same program). The embedded LLVM bitcode
# (.llvmbc, only for Rust's cross-language LTO) goes too: binutils' LLVM plugin, present where
# clang is installed, aborts `ar` and `nm` on bitcode of a newer LLVM.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/hdb-install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
readelf -W --dyn-syms "$out/libhdb.so" |
  awk '$5 == "GLOBAL" && $7 != "UND" && $8 ~ /^hdb_/ { print $8 }' | sort -u > "$tmp/keep"
[[ -s "$tmp/keep" ]] || { echo "install.sh: no hdb_* symbols in $out/libhdb.so" >&2; exit 1; }
ld -r --whole-archive "$out/libhdb.a" -o "$tmp/hdb.o"
objcopy --keep-global-symbols="$tmp/keep" --remove-section=.llvmbc --remove-section=.llvmcmd "$tmp/hdb.o"
rm -f "$lib/libhdb.a"
ar rcs "$lib/libhdb.a" "$tmp/hdb.o"

install -m 644 include/hdb.h include/hdb.hpp "$prefix/include/"

# What a static link needs besides libhdb.a (rustc's native-static-libs for this target).
static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
cat > "$lib/pkgconfig/hdb.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: hdb
Description: HyperDreamBooth runtime for Stable Diffusion 1.x (C ABI $abi)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lhdb
Libs.private: $static_libs
EOF

cat > "$lib/cmake/hdb/hdbConfigVersion.cmake" <<EOF
# Compatible with a request for the same major version and an older or equal minor.
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION_MAJOR EQUAL "$(cut -d. -f1 <<<"$version")"
   AND NOT PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION VERSION_EQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
else()
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
EOF

# Paths relative to this file, so the installed tree may be moved.
cat > "$lib/cmake/hdb/hdbConfig.cmake" <<EOF
# find_package(hdb) -> hdb::hdb (libhdb.so.$abi) and hdb::hdb_static (libhdb.a).
get_filename_component(_hdb_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(hdb_VERSION "$version")
set(hdb_ABI_VERSION $abi)
set(hdb_INCLUDE_DIRS "\${_hdb_prefix}/include")
if(NOT TARGET hdb::hdb)
  add_library(hdb::hdb SHARED IMPORTED)
  set_target_properties(hdb::hdb PROPERTIES
    IMPORTED_LOCATION "\${_hdb_prefix}/lib/libhdb.so.$abi"
    IMPORTED_SONAME "libhdb.so.$abi"
    INTERFACE_INCLUDE_DIRECTORIES "\${_hdb_prefix}/include")
endif()
if(NOT TARGET hdb::hdb_static)
  add_library(hdb::hdb_static STATIC IMPORTED)
  set_target_properties(hdb::hdb_static PROPERTIES
    IMPORTED_LOCATION "\${_hdb_prefix}/lib/libhdb.a"
    INTERFACE_INCLUDE_DIRECTORIES "\${_hdb_prefix}/include"
    INTERFACE_LINK_LIBRARIES "gcc_s;util;rt;pthread;m;dl;c")
endif()
unset(_hdb_prefix)
EOF
echo "installed hdb $version (ABI $abi, $profile build) into $prefix"

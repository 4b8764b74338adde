#!/usr/bin/env bash
# Runs the C API test programs (tests/c/*.c) under valgrind's memcheck, against
# target/debug/libhdb.so. They are built here WITHOUT sanitizers (valgrind and ASan don't mix);
# `cargo test --test c_api` runs the same programs with ASan/LSan/UBSan instead.
#
# Each program runs as `<prog> tests/fixtures <fresh temp dir>`, as in tests/c_api.rs, under
#   valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect
# A memory error, a definite or indirect leak, or a failed check fails the script. Finally the
# canary tests/c/canary/leak_model.c (which never frees its model) must be reported as leaking,
# proving the leak check works.
#
# Usage: scripts/valgrind-c-tests.sh [program ...]   (default: every tests/c/*.c)
# Env:   CC (default cc), CARGO_TARGET_DIR, KEEP=1 to keep the build/run dir, JOBS (programs
#        under valgrind at once; default: the number of cores).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command -v valgrind >/dev/null || { echo "valgrind-c-tests: valgrind is not installed" >&2; exit 2; }
cc="${CC:-cc}"

echo "== cargo build --lib"
cargo build --lib
so="${CARGO_TARGET_DIR:-$root/target}/debug/libhdb.so"
[[ -f "$so" ]] || { echo "valgrind-c-tests: $so was not built" >&2; exit 2; }
so="$(readlink -f "$so")"

work="$(mktemp -d "${TMPDIR:-/tmp}/hdb-valgrind.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "(keeping $work)"
else
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/lib" "$work/bin"
# The SONAME is libhdb.so.1: link and load through symlinks with that name.
ln -s "$so" "$work/lib/libhdb.so"
ln -s "$so" "$work/lib/libhdb.so.1"

build() { # build <source> <exe>
    "$cc" -std=c11 -Wall -Wextra -Werror -g -O0 -I include "$1" -o "$2" \
        -L"$work/lib" -lhdb -Wl,-rpath,"$work/lib" -pthread -lm
}

run_valgrind() { # run_valgrind <name> <exe> <log>
    local rundir="$work/run-$1"
    mkdir -p "$rundir"
    # HDB_TEST_QUICK: programs that loop (the threads test) do one round, not three.
    env -u RUST_LOG HDB_TEST_QUICK=1 valgrind -q --error-exitcode=1 --leak-check=full \
        --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
        "$2" "$root/tests/fixtures" "$rundir" >"$3" 2>&1
}

if [[ $# -gt 0 ]]; then
    programs=("$@")
else
    # The longest first (threads: about 3 minutes), so the others fill the other cores.
    programs=(threads)
    for src in tests/c/*.c; do
        [[ "$(basename "$src" .c)" == threads ]] || programs+=("$(basename "$src" .c)")
    done
fi

# Each program under valgrind uses one core (valgrind runs one thread at a time): run as many
# at once as there are cores, then report in order.
jobs_max="${JOBS:-$(nproc)}"
for name in "${programs[@]}"; do build "tests/c/$name.c" "$work/bin/$name"; done
run_one() { # run_one <name>: writes $work/<name>.log and $work/<name>.rc
    local start=$SECONDS rc=0
    run_valgrind "$1" "$work/bin/$1" "$work/$1.log" || rc=$?
    echo "$rc $((SECONDS - start))" >"$work/$1.rc"
}
for name in "${programs[@]}"; do
    while [[ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]]; do wait -n || true; done
    run_one "$name" &
done
wait

failed=()
for name in "${programs[@]}"; do
    log="$work/$name.log"
    read -r rc secs <"$work/$name.rc"
    if [[ $rc == 0 ]] && grep -q "^PASS $name: " "$log"; then
        echo "ok    $name ($(grep "^PASS $name: " "$log" | sed 's/.*: //'), ${secs}s)"
    else
        echo "FAIL  $name (exit $rc, ${secs}s):"
        grep -v '^ok [0-9]*: ' "$log" | sed 's/^/    /'
        failed+=("$name")
    fi
done

# The canary: a program that leaks a model must make valgrind fail.
build tests/c/canary/leak_model.c "$work/bin/canary_leak_model"
if run_valgrind canary "$work/bin/canary_leak_model" "$work/canary.log"; then
    echo "FAIL  canary: valgrind did not report the deliberately leaked model"
    failed+=("canary")
elif grep -q "definitely lost" "$work/canary.log"; then
    echo "ok    canary (the deliberately leaked model is reported)"
else
    echo "FAIL  canary: failed, but not with a leak report:"
    sed 's/^/    /' "$work/canary.log"
    failed+=("canary")
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "valgrind-c-tests: FAILED: ${failed[*]}"
    exit 1
fi
echo "valgrind-c-tests: all passed"

#!/usr/bin/env bash
# ThreadSanitizer run of the threads test (tests/c/threads.c: threads x sessions on one shared
# model, adapters and hypernetwork) and of the log-callback swap test (tests/c/log_threads.c).
# libhdb.so and the Rust standard library are rebuilt with -Zsanitizer=thread (stable Rust
# with RUSTC_BOOTSTRAP=1 and -Zbuild-std, which needs the rust-src component), the C programs
# are instrumented by gcc -fsanitize=thread and linked against Rust's own TSan runtime (LLVM's:
# gcc 12's libtsan lacks the __tsan_memcpy/memset/memmove that LLVM's instrumentation calls),
# exported to libhdb.so with -rdynamic. Any data race report fails.
#
#   scripts/tsan.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  echo "rust-src is missing: rustup component add rust-src" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1
RUSTFLAGS="-Zsanitizer=thread" cargo build -Zbuild-std --target "$target" --lib \
  --target-dir target/tsan 2>&1 | grep -v '^\s*Compiling' || true
lib="$PWD/target/tsan/$target/debug"
rt="$(rustc --print sysroot)/lib/rustlib/$target/lib/librustc-stable_rt.tsan.a"
test -f "$lib/libhdb.so"
ln -sf libhdb.so "$lib/libhdb.so.1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for prog in threads log_threads; do
  cc -std=c11 -g -O1 -fsanitize=thread -Iinclude -c "tests/c/$prog.c" -o "$work/$prog.o"
  cc "$work/$prog.o" -o "$work/$prog" -rdynamic -Wl,--whole-archive "$rt" -Wl,--no-whole-archive \
    -L"$lib" -lhdb -Wl,-rpath,"$lib" -pthread -lm -ldl -lrt -lstdc++
  mkdir -p "$work/run-$prog"
  if TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 report_signal_unsafe=0" \
      "$work/$prog" tests/fixtures "$work/run-$prog" >"$work/$prog.log" 2>&1 &&
      ! grep -q "ThreadSanitizer" "$work/$prog.log"; then
    echo "tsan $prog: $(grep '^PASS' "$work/$prog.log")"
  else
    echo "tsan $prog: FAILED" >&2
    cat "$work/$prog.log" >&2
    status=1
  fi
done
exit $status

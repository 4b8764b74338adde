#!/usr/bin/env bash
# Runs hdb's GPU tests without a GPU, on an emulated one: tests/emu/gpu.cpp, a shared library
# installed as libcuda.so and libcublas.so, runs the CUDA driver API, cuBLAS's GEMMs and every
# kernel (on the host, under tests/emu/cuda_emu.h). The CUDA backend is unchanged: cudarc loads
# the library by its usual names, NVRTC (from pip) compiles the kernels to PTX, and the
# emulation runs the kernels the PTX names. What this checks that the kernel emulation (the emu::
# tests of tests/backend_ops/) does
# not: the Rust glue (launch arguments, cuBLAS calls and their layouts, buffer sizes and
# offsets, device memory use), the models on `Cuda<T>`, the adapter paths, and the C API and
# pipeline on a CUDA runtime. What it cannot see: timing, and the GPU's own rounding.
#
#   scripts/emulated-gpu.sh                   # every GPU test (backend_ops gpu::, cuda_unet, ...)
#   scripts/emulated-gpu.sh --test cuda_unet faults -- --nocapture   # other cargo test arguments
#
# Tests run one at a time (--test-threads=1): the emulation runs one kernel at a time anyway,
# and tests/cuda_unet/faults.rs injects faults that would hit a test running beside it. A test
# that finds no device prints SKIPPED; here that is a failure. Cases too large for the
# emulation's speed print "skipped on the emulated GPU" and are left to scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac

echo "emulated-gpu: building the emulated GPU (tests/emu/gpu.cpp) into $target/tmp/emulated-gpu"
cargo test -q --test backend_ops -- --ignored --exact emulated_gpu_library \
  >/dev/null
lib="$target/tmp/emulated-gpu"
[ -e "$lib/libcuda.so" ] || { echo "emulated-gpu: $lib/libcuda.so was not built"; exit 1; }
eval "$(scripts/nvrtc-env.sh)"
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HDB_KERNEL_CACHE="${HDB_KERNEL_CACHE:-$target/tmp/kernel-cache}"

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
if [ $# -gt 0 ]; then
  # cargo's arguments, then the test binaries' (after a `--`), which always get --include-ignored.
  cargo_args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do cargo_args+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  cargo test "${cargo_args[@]}" -- --include-ignored --test-threads=1 "$@" 2>&1 |
    tee "$log_dir/all.log"
  rc=${PIPESTATUS[0]}
else
  # Every GPU test binary, as many at once as there are cores (the emulation is one thread).
  # (cli_predict: `hdb predict --device cuda` on the emulated GPU against the CPU's adapter.)
  tests="cuda_unet cuda_models backend_ops cli_predict"
  echo "emulated-gpu: building the GPU test binaries ($tests)"
  cargo test --no-run $(printf -- '--test %s ' $tests) --message-format=json 2>/dev/null |
    python3 scripts/test-binaries.py >"$log_dir/binaries"
  [ "$(wc -l <"$log_dir/binaries")" -eq 4 ] || { echo "emulated-gpu: building the GPU tests failed"; exit 1; }
  # cuda_unet is the longest (about 9 minutes alone on one core): its adapter tests (about 5)
  # run as a second process beside the rest of it, both first, so two cores share it.
  awk '$1 == "cuda_unet" {print; print "cuda_unet-adapters", $2}' "$log_dir/binaries" >"$log_dir/first"
  grep -v '^cuda_unet ' "$log_dir/binaries" >>"$log_dir/first"
  mv "$log_dir/first" "$log_dir/binaries"
  # And every path of `hdb bench cuda --unet` at small shapes, so a bench that would fail on a
  # GPU fails here first (cargo test built the binary with the cuda feature).
  echo "hdb-bench-cuda-smoke $target/debug/hdb" >>"$log_dir/binaries"
  # And `hdb demo --device cuda`, small: hypernetwork, identities, swaps, images, on the device.
  echo "hdb-demo-cuda $target/debug/hdb" >>"$log_dir/binaries"
  jobs_max="$(nproc)"
  rc=0
  n_jobs="$(wc -l <"$log_dir/binaries")"
  start="$(date +%s)"
  echo "emulated-gpu: $n_jobs test processes, $jobs_max at a time; a line as each ends and" \
    "one every minute, then their output"
  # A line a minute, so the long quiet stretch does not look like a hang.
  (
    while sleep 60; do
      ended=$(find "$log_dir" -maxdepth 1 -name '*.rc' | wc -l)
      lines=$(cat "$log_dir"/*.log 2>/dev/null | grep -c '^cuda-' || true)
      echo "emulated-gpu: $((($(date +%s) - start) / 60)) min: $ended of $n_jobs processes" \
        "ended, $lines parity lines so far"
    done
  ) &
  heartbeat=$!
  trap 'kill "$heartbeat" 2>/dev/null || true; rm -rf "$log_dir"' EXIT
  pids=()
  while read -r name exe; do
    while [ "$(jobs -rp | grep -vxc "$heartbeat")" -ge "$jobs_max" ]; do wait -n || true; done
    (
      t0="$(date +%s)"
      # No errexit here: a failing binary must still write its status for the summary below.
      set +e
      if [ "$name" = hdb-bench-cuda-smoke ]; then
        "$exe" bench cuda --unet --smoke 2>&1
        echo $? >"$log_dir/$name.rc"
      elif [ "$name" = hdb-demo-cuda ]; then
        "$exe" demo --device cuda --steps 2 --size 64 --out "$log_dir/demo" 2>&1
        echo $? >"$log_dir/$name.rc"
      elif [ "$name" = cuda_unet ]; then
        "$exe" --skip adapters:: --include-ignored --test-threads=1 --nocapture 2>&1
        echo $? >"$log_dir/$name.rc"
      elif [ "$name" = cuda_unet-adapters ]; then
        "$exe" adapters:: --include-ignored --test-threads=1 --nocapture 2>&1
        echo $? >"$log_dir/$name.rc"
      elif [ "$name" = backend_ops ]; then
        # Its gpu:: tests; the rest (the kernel emulation, emu::) ran in plain cargo test.
        "$exe" gpu:: --include-ignored --test-threads=1 --nocapture 2>&1
        echo $? >"$log_dir/$name.rc"
      else
        "$exe" --include-ignored --test-threads=1 --nocapture 2>&1
        echo $? >"$log_dir/$name.rc"
      fi >"$log_dir/$name.log"
      echo "emulated-gpu: $name $([ "$(cat "$log_dir/$name.rc")" = 0 ] && echo ok || echo FAILED)" \
        "in $(($(date +%s) - t0)) s"
    ) &
    pids+=($!)
  done <"$log_dir/binaries"
  for p in "${pids[@]}"; do wait "$p" || true; done
  kill "$heartbeat" 2>/dev/null || true
  while read -r name _; do
    echo "== $name"
    cat "$log_dir/$name.log"
    [ "$(cat "$log_dir/$name.rc")" = 0 ] || echo "emulated-gpu: $name failed"
  done <"$log_dir/binaries" | tee "$log_dir/all.log"
  for f in "$log_dir"/*.rc; do [ "$(cat "$f")" = 0 ] || rc=1; done
fi
if grep -q "SKIPPED" "$log_dir/all.log"; then
  echo "emulated-gpu: a test did not open the emulated GPU (SKIPPED above)"
  exit 1
fi
echo "emulated-gpu: $(grep -c '^cuda-' "$log_dir/all.log") parity lines, $(grep -c 'skipped on the emulated GPU' "$log_dir/all.log") cases left to a real GPU"
exit "$rc"

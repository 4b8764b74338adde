#!/usr/bin/env bash
# Runs hdb's GPU tests without a GPU, on an emulated one: tests/emu/gpu.cpp, a shared library
# installed as libcuda.so and libcublas.so, runs the CUDA driver API, cuBLAS's GEMMs and every
# kernel (on the host, under tests/emu/cuda_emu.h). The CUDA backend is unchanged: cudarc loads
# the library by its usual names, NVRTC (from pip) compiles the kernels to PTX, and the
# emulation runs the kernels the PTX names. What this checks that tests/kernel_emulation/ does
# not: the Rust glue (launch arguments, cuBLAS calls and their layouts, buffer sizes and
# offsets, device memory use), the models on `Cuda<T>`, the adapter paths, and the C API and
# pipeline on a CUDA runtime. What it cannot see: timing, and the GPU's own rounding.
#
#   scripts/emulated-gpu.sh                   # every GPU test (cuda_parity, cuda_backend, ...)
#   scripts/emulated-gpu.sh --test cuda_unet faults -- --nocapture   # other cargo test arguments
#
# A test that finds no device prints SKIPPED; here that is a failure. Cases too large for the
# emulation's speed print "skipped on the emulated GPU" and are left to scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

cargo test -q --features cuda --test kernel_emulation -- --ignored --exact emulated_gpu_library \
  >/dev/null
lib="$target/tmp/emulated-gpu"
[ -e "$lib/libcuda.so" ] || { echo "emulated-gpu: $lib/libcuda.so was not built"; exit 1; }
eval "$(scripts/nvrtc-env.sh)"
export LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HDB_KERNEL_CACHE="${HDB_KERNEL_CACHE:-$PWD/$target/tmp/kernel-cache}"

if [ $# -eq 0 ]; then
  set -- --test cuda_parity --test cuda_backend --test cuda_adapters --test cuda_unet --test cuda_models
fi
# cargo's arguments, then the test binaries' (after a `--`), which always get --include-ignored.
cargo_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do cargo_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --features cuda "${cargo_args[@]}" -- --include-ignored "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if grep -q "SKIPPED" "$log"; then
  echo "emulated-gpu: a test did not open the emulated GPU (SKIPPED above)"
  exit 1
fi
echo "emulated-gpu: $(grep -c '^cuda-' "$log") parity lines, $(grep -c 'skipped on the emulated GPU' "$log") cases left to a real GPU"
exit "$rc"

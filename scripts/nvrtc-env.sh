#!/usr/bin/env bash
# Makes NVRTC (the CUDA runtime compiler) available without a CUDA toolkit or a GPU, for the
# kernel compile check (tests/kernels_compile.rs):
#
#   eval "$(scripts/nvrtc-env.sh)" && cargo test --test kernels_compile -- --include-ignored
#
# Installs, once, the pip packages nvidia-cuda-nvrtc-cu12 (libnvrtc.so.12 and its builtins)
# and nvidia-cuda-runtime-cu12 (cuda_fp16.h, cuda_bf16.h, ...) into a venv under the cargo
# target dir, then prints `export` lines on stdout; progress goes to stderr.
# - LD_LIBRARY_PATH gains the folder holding libnvrtc.so.12. cudarc's dynamic loader tries
#   libnvrtc.so.12 among its names, so no symlink is needed; libnvrtc finds its builtins
#   library beside itself (RUNPATH $ORIGIN).
# - HDB_CUDA_INCLUDE is the CUDA include folder; the compile test passes it to NVRTC as an
#   include path. hdb's kernels include no CUDA header today, so it is there for kernels
#   that may.
# Versions are pinned to CUDA 12.8, the API version cudarc is built against (feature
# cuda-12080 in Cargo.toml). Env: CARGO_TARGET_DIR (default: target), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_VERSION=12.8.93
RUNTIME_VERSION=12.8.90
target="${CARGO_TARGET_DIR:-target}"
venv="$target/nvrtc-venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "nvrtc-env: creating $venv" >&2
  "$python" -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -m pip show -q "nvidia-cuda-nvrtc-cu12" >/dev/null 2>&1 ||
   ! "$venv/bin/python" -m pip show -q "nvidia-cuda-runtime-cu12" >/dev/null 2>&1; then
  echo "nvrtc-env: installing nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" \
       "nvidia-cuda-runtime-cu12==$RUNTIME_VERSION" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" "nvidia-cuda-runtime-cu12==$RUNTIME_VERSION" >&2
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
lib="$(cd "$site/nvidia/cuda_nvrtc/lib" && pwd)"
inc="$(cd "$site/nvidia/cuda_runtime/include" && pwd)"
if [ ! -e "$lib/libnvrtc.so.12" ]; then
  echo "nvrtc-env: $lib has no libnvrtc.so.12" >&2
  exit 1
fi
if [ ! -e "$inc/cuda_fp16.h" ]; then
  echo "nvrtc-env: $inc has no cuda_fp16.h" >&2
  exit 1
fi

printf 'export LD_LIBRARY_PATH=%q\n' "$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
printf 'export HDB_CUDA_INCLUDE=%q\n' "$inc"

#!/usr/bin/env bash
# Every check hdb has, in the order a failure is cheapest to read: formatting, lints, the Rust
# and C test suites (C under AddressSanitizer + UBSan via cargo test), the CUDA kernels through
# NVRTC, on a host emulation, and the GPU tests on an emulated GPU, then the C programs under
# valgrind, then a short run of every fuzz target. This is the README's test command and what
# .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The CUDA backend must keep compiling on machines without CUDA.
cargo clippy --features cuda --all-targets -- -D warnings
# Docs build without broken or private intra-doc links (docs/backend.md points newcomers here).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features cuda
cargo test
# The CUDA backend's host-side unit tests (launch plans, chunking, limits): no GPU needed.
cargo test --features cuda --lib
# The CUDA kernels must compile for sm_80 and sm_90: NVRTC from pip, no GPU needed.
nvrtc_env="$(scripts/nvrtc-env.sh)"
( eval "$nvrtc_env"; cargo test --features cuda --test kernels_compile )
# The kernels also run, without a GPU: tests/emu/cuda_emu.h emulates CUDA on the host (needs
# g++), and each kernel's output must match the CPU backend's.
cargo test --features cuda --test kernel_emulation
# The GPU tests are #[ignore]d (counted as skipped) without a GPU; scripts/gpu-check.sh runs
# them on a GPU machine, and here they run on an emulated GPU (tests/emu/gpu.cpp: the CUDA
# driver API and cuBLAS on the host, the kernels under cuda_emu.h), every one of them.
scripts/emulated-gpu.sh
scripts/valgrind-c-tests.sh
# Every parser and loader under coverage-guided fuzzing (cargo-fuzz), a few seconds a target:
# a smoke run (the corpora replay under cargo test above; long runs: scripts/fuzz.sh --seconds N).
scripts/fuzz.sh --sanitizer none --seconds 4

#!/usr/bin/env bash
# Every check hdb has, in the order a failure is cheapest to read: formatting, lints and docs
# of the default build (CPU + the CUDA backend, loaded at run time) and of the CPU-only build,
# the Rust and C test suites (C under AddressSanitizer + UBSan via cargo test; the CUDA kernels
# on a host emulation of CUDA), the kernels through NVRTC, the GPU tests on an emulated GPU,
# the packaging and the language bindings, the CPU ops on aarch64 under qemu-user, the C
# programs under valgrind, then a short run of every fuzz target. This is the README's test
# command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build per configuration, never rebuilt: incremental caches would only take disk (the CI
# machine's disk is shared; a full one kills the linker with SIGBUS). Each phase prints the
# space left, so a failure from a full disk reads as one.
export CARGO_INCREMENTAL=0
phase() {
  echo "== test-all: $* ($(date -u +%T), ${SECONDS}s in, $(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ') free)"
}
phase "cargo fmt --check"
cargo fmt --check
phase "clippy, docs: default build"
cargo clippy --all-targets -- -D warnings
# Docs build without broken or private intra-doc links (docs/backend.md points newcomers here).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
# The CPU-only build (`--no-default-features --features cli`) must keep compiling, linking
# and refusing cuda:N cleanly on machines without CUDA. Without the `avx512` feature it also
# runs the unit tests on the AVX2+FMA kernels (hdb's and gemm's), as an AVX2 machine would.
phase "clippy, docs, build, unit tests: CPU-only build"
cpu_only=(--no-default-features --features cli)
cargo clippy "${cpu_only[@]}" --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps "${cpu_only[@]}"
cargo build "${cpu_only[@]}"
cargo test "${cpu_only[@]}" --lib
# Every test of the default build; the kernels also run here without a GPU
# (the emu:: rows of tests/backend_ops: tests/emu/cuda_emu.h emulates CUDA on the host, needs g++, and each
# kernel's output must match the CPU backend's). The GPU tests are #[ignore]d (skipped) here.
phase "cargo test"
cargo test
# The CUDA kernels must compile for sm_80 and sm_90: NVRTC from pip, no GPU needed.
phase "kernels through NVRTC"
nvrtc_env="$(scripts/nvrtc-env.sh)"
( eval "$nvrtc_env"; cargo test --test kernels_compile -- --include-ignored )
# The GPU tests: scripts/gpu-check.sh runs them on a GPU machine, and here they run on an
# emulated GPU (tests/emu/gpu.cpp: the CUDA driver API and cuBLAS on the host, the kernels
# under cuda_emu.h), every one of them.
phase "GPU tests on the emulated GPU"
scripts/emulated-gpu.sh
# The installed package (scripts/install.sh) through pkg-config and CMake, include/hdb.hpp
# under ASan/UBSan in both error modes, and every binding in bindings/ (its README says what).
phase "bindings"
scripts/test-bindings.sh
# The CPU ops on ARM: cross-compiled for aarch64 and run under qemu-user.
phase "CPU op tests on aarch64 (qemu-user)"
scripts/arm-tests.sh
phase "C tests under valgrind"
scripts/valgrind-c-tests.sh
# Every parser and loader under coverage-guided fuzzing (cargo-fuzz), a few seconds a target:
# a smoke run (the corpora replay under cargo test above; long runs: scripts/fuzz.sh --seconds N).
phase "fuzz smoke run"
scripts/fuzz.sh --sanitizer none --seconds 4
phase "every check passed"

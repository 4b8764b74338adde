#!/usr/bin/env bash
# The CPU backend's op tests on ARM (aarch64): cross-compiled with Debian's aarch64 toolchain
# and run under qemu-user (issue 19: an ARM build must compile and its ops pass). CPU-only
# build; hdb has no NEON-specific kernels of its own (its SIMD paths are x86; the `gemm`
# crate brings its own NEON GEMM), so this checks the portable paths and gemm's on ARM.
# Needs: rustup target aarch64-unknown-linux-gnu, gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --target aarch64-unknown-linux-gnu --no-default-features --lib backend::cpu "$@"

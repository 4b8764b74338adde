#!/usr/bin/env bash
# Every check hdb has, in the order a failure is cheapest to read: formatting, lints, the Rust
# and C test suites (C under AddressSanitizer + UBSan via cargo test), then the C programs under
# valgrind. This is the README's test command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The CUDA backend must keep compiling on machines without CUDA.
cargo clippy --lib --features cuda -- -D warnings
cargo test
scripts/valgrind-c-tests.sh

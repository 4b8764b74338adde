#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser and loader (fuzz/harness.rs) with cargo-fuzz
# (libFuzzer): builds the targets, makes the seed corpora from tests/fixtures
# (scripts/fuzz-seeds.py), runs each target for a time box and prints one line of statistics
# per target (executions, coverage, corpus). Fails when a target finds a crash (the input is
# kept under fuzz/artifacts/<target>/; once fixed, it belongs in fuzz/regressions/<target>/,
# which every run and tests/fuzz_corpus.rs replay and no merge ever drops). cargo-fuzz needs nightly features: on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them (set here).
#
#   scripts/fuzz.sh [--seconds N] [--sanitizer address|none] [--merge] [TARGET...]
#
# --seconds N   time box per target (default 5; CI uses this)
# --sanitizer   address (default: AddressSanitizer, what long runs want) or none (faster to
#               build and run; what CI's short run uses)
# --merge       afterwards, minimize each target's committed corpus (fuzz/corpus/<target>)
#               together with what this run found, keeping inputs of at most 2 KB
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=5
sanitizer=address
merge=0
max_kb=2
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --sanitizer) sanitizer="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); explicit=1; shift ;;
  esac
done
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz --version $(cat fuzz/cargo-fuzz.version) --locked" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
# Each sanitizer its own target dir, so switching does not rebuild the other.
target_dir="fuzz/target/$sanitizer"
# (cargo fuzz build takes one target or none, meaning all of them.)
build() {
  (cd fuzz && CARGO_TARGET_DIR="target/$sanitizer" cargo fuzz build -O -s "$sanitizer" "$@" 2>&1 |
    grep -v '^\s*Compiling') || true
}
if [ -z "${explicit:-}" ]; then build; else for t in "${targets[@]}"; do build "$t"; done; fi
bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
python3 scripts/fuzz-seeds.py target/fuzz-seeds >/dev/null
status=0
printf '%-16s %10s %9s %8s %8s %7s  %s\n' target runs exec/s cov ft corpus result
for t in "${targets[@]}"; do
  work="target/fuzz-work/$t"
  mkdir -p "$work" "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/regressions/$t"
  log="target/fuzz-work/$t.log"
  # The first folder is where new inputs go; the committed corpus, the crash regressions and
  # the seeds are read only.
  if "$bin_dir/$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$t/" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" \
      "target/fuzz-seeds/$t" \
      >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (see $log and fuzz/artifacts/$t/)"
    status=1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  corpus=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  printf '%-16s %10s %9s %8s %8s %7s  %s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corpus:-?}" "$result"
  if [ "$merge" = 1 ] && [ "$result" = ok ]; then
    # Only small inputs are committed (the corpora stay a few hundred KB in all; large
    # structured inputs come back from the seeds): the smallest set of them that keeps their
    # coverage.
    small="target/fuzz-work/$t.small" merged="target/fuzz-work/$t.merged"
    rm -rf "$small" "$merged" && mkdir -p "$small" "$merged"
    find "fuzz/corpus/$t" "$work" -type f -size -"$((max_kb + 1))"k -exec cp -n -t "$small" {} +
    "$bin_dir/$t" -merge=1 -timeout=20 -rss_limit_mb=3072 "$merged" "$small" >"$log.merge" 2>&1
    rm -rf "fuzz/corpus/$t" && mv "$merged" "fuzz/corpus/$t"
  fi
done
exit $status

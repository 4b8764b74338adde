#!/usr/bin/env bash
# The CUDA backend's check on a machine with an NVIDIA GPU (DESIGN.md section 6, issue 7):
# every CUDA parity test (each op against the CPU backend on fresh random inputs; the whole
# UNet in f32/f16/bf16 against the CPU's f32), then `hdb bench cuda` against PyTorch on the
# same GPU, then a short table. About 3-5 minutes.
#
#   scripts/gpu-check.sh              on the GPU machine: builds with cargo if it is there,
#                                     else runs what --prepare left in .gpu/
#   scripts/gpu-check.sh --prepare    on a build machine without a GPU: builds the test and
#                                     bench binaries into .gpu/ (x86-64 Linux, glibc <= the
#                                     GPU machine's) for a GPU machine without Rust
#   scripts/gpu-check.sh parity memcheck   only those phases (of parity, memcheck, bench, train), e.g.
#                                     to split a run across two device calls of at most 10
#                                     minutes each; no phase named means all three
#
# Needs on the GPU machine: the NVIDIA driver, libnvrtc and libcublas (any CUDA 12 or 13
# install; found under /usr/local/cuda* or pip's nvidia-* packages), python3 with torch for
# the peer and diffusers for the UNet peer (wheels in .whl/ are installed to a temp dir if
# diffusers is missing). Logs go to $OUT (or .gpu/out) as parity.log and bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bin=.gpu
# The GPU test binaries, in the order a failure is cheapest to read: ops, then models.
gpu_tests="backend_ops cuda_unet cuda_models"
out="${OUT:-$bin/out}"

phases="${*:-parity memcheck bench}"
want() { case " $phases " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for p in $phases; do
  case "$p" in parity|memcheck|bench|train|--prepare) ;; *) echo "gpu-check: unknown phase '$p' (parity, memcheck, bench, train)"; exit 2 ;; esac
done

if [ "${1:-}" = --prepare ]; then
  set -e
  mkdir -p "$bin"
  cargo build --release --bin hdb
  cargo test --release --no-run $(printf -- '--test %s ' $gpu_tests) \
    --message-format=json 2>/dev/null | python3 scripts/test-binaries.py |
    while read -r name exe; do cp "$exe" "$bin/$name" && echo "prepared $name"; done
  cp target/release/hdb "$bin/hdb"
  for t in hdb $gpu_tests; do strip --strip-debug "$bin/$t"; done
  # Tests find fixtures and tools through the build's CARGO_MANIFEST_DIR.
  echo "$root" >"$bin/manifest-dir"
  du -sh "$bin"
  exit 0
fi

mkdir -p "$out"
echo "== gpu-check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || {
  echo "gpu-check: nvidia-smi failed: no GPU here"; exit 1; }

# libnvrtc and libcublas by the names cudarc tries (libnvrtc.so, libcublas.so, *.so.12):
# link whichever version is installed into one folder, and put the real folders on the path
# too (libnvrtc finds its builtins, libcublas its Lt library, beside themselves).
libs="$(mktemp -d)"
for name in nvrtc cublas; do
  found=""
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
             $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | xargs -n1 -I{} find {}/nvidia -maxdepth 3 -type d -name lib 2>/dev/null); do
    f="$(ls "$dir"/lib$name.so.[0-9]* 2>/dev/null | grep -v alt | sort -V | tail -1)"
    if [ -n "$f" ]; then found="$f"; break; fi
  done
  if [ -z "$found" ]; then echo "gpu-check: lib$name not found"; exit 1; fi
  ln -sf "$found" "$libs/lib$name.so"
  export LD_LIBRARY_PATH="$libs:$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "lib$name: $found"
done

if command -v cargo >/dev/null && [ ! -x "$bin/backend_ops" ]; then
  echo "== building with cargo"
  "$0" --prepare || exit 1
fi
for b in hdb $gpu_tests; do
  [ -x "$bin/$b" ] || { echo "gpu-check: $bin/$b missing (run scripts/gpu-check.sh --prepare)"; exit 1; }
done
want="$(cat "$bin/manifest-dir")"
if [ "$want" != "$root" ] && [ ! -e "$want" ]; then
  mkdir -p "$(dirname "$want")" && ln -s "$root" "$want"
fi

python3 -c 'import diffusers' 2>/dev/null || {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/hdb-site .whl/*.whl &&
      export PYTHONPATH=/tmp/hdb-site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# One kernel cache for the run (and for later calls on the same machine): every test process
# after the first that needs a kernel file reads its PTX instead of compiling it again
# (seconds each for attention.cu). Entries are keyed by their source, so none goes stale.
# Tests that run the CLI find the carried binary (the build machine's path is not here).
export HDB_TEST_HDB_BIN="$root/$bin/hdb"
export HDB_KERNEL_CACHE="${HDB_KERNEL_CACHE:-$root/$bin/kernel-cache}"
echo "kernel cache: $HDB_KERNEL_CACHE"

status=0
# Per-test logs stay out of $out (a device call brings back only a few files from it).
pdir="$(mktemp -d)"
# Parity tests run this many at a time (each in its own process on the one GPU; they are not
# timed), with the memcheck beside them; the bench runs alone after both.
jobs_max="${GPU_CHECK_JOBS:-4}"
# Seconds from the start by which the run should end (0: no limit). The bench's time limits
# shrink to fit, so a device call with a hard limit still gets the summary.
deadline="${GPU_CHECK_DEADLINE:-0}"
left() { [ "$deadline" -gt 0 ] && echo $((deadline - SECONDS)) || echo 100000; }
phase_start=$SECONDS

# One test in its own process: a kernel fault poisons its CUDA context, and should not take
# the tests after it down too. Output to $pdir/<n>.log, exit status to <n>.rc.
run_test() { # n binary test
  local n=$1 t=$2 name=$3 t0=$SECONDS rc
  timeout 120 "$bin/$t" --exact "$name" --include-ignored --test-threads=1 --nocapture \
    >"$pdir/$n.log" 2>&1
  rc=$?
  echo $rc >"$pdir/$n.rc"
  printf '%-6s %4ss  %s %s\n' "$([ $rc = 0 ] && echo ok || echo FAILED)" $((SECONDS - t0)) "$t" "$name"
}

memcheck_pid=""
if want memcheck; then
  # Out-of-bounds and misaligned accesses that happen not to fault (every parity test but the
  # fault test, whose 16 TiB allocation the sanitizer would report).
  export PATH="$PATH:/usr/local/cuda/bin"
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer --tool memcheck (backend_ops gpu::), beside the parity tests"
    ( t0=$SECONDS
      timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/backend_ops" \
        gpu:: --include-ignored --test-threads=1 --skip gpu::faults >"$out/memcheck.log" 2>&1
      echo $? >"$pdir/memcheck.rc"
      echo "memcheck done in $((SECONDS - t0)) s (exit $(cat "$pdir/memcheck.rc"))" ) &
    memcheck_pid=$!
  else
    echo "== compute-sanitizer not found: memcheck skipped"
  fi
fi

if want parity; then
  echo "== parity (tests/{backend_ops,cuda_unet,cuda_models}), $jobs_max at a time"
  cases="$pdir/cases"
  # backend_ops's kernel emulation (emu::, selftest::) needs g++ and no GPU: CI runs it.
  for t in $gpu_tests; do
    "$bin/$t" --list 2>/dev/null | sed -n "s/: test\$//p" | sed "s/^/$t /"
  done | grep -vE "^backend_ops (emu::|selftest::|every_kernel_has_a_case|emulated_gpu_library)" >"$cases"
  n=0
  while read -r t name; do
    n=$((n + 1))
    while [ "$(jobs -rp | grep -vx "${memcheck_pid:-none}" | wc -l)" -ge "$jobs_max" ]; do wait -n; done
    run_test "$(printf %03d $n)" "$t" "$name" &
  done <"$cases"
  for p in $(jobs -rp | grep -vx "${memcheck_pid:-none}"); do wait "$p"; done
  cat "$pdir"/[0-9]*.log >"$out/parity.log"
  for f in "$pdir"/[0-9]*.rc; do
    [ "$(cat "$f")" = 0 ] || { echo "gpu-check: $(sed -n "$(basename "$f" .rc | sed 's/^0*//')p" "$cases" | cut -d' ' -f1-2) failed (exit $(cat "$f"))" | tee -a "$out/parity.log"; status=1; }
  done
  echo "parity: $(wc -l <"$cases") tests in $((SECONDS - phase_start)) s"
  if grep -q "SKIPPED" "$out/parity.log"; then
    echo "gpu-check: tests skipped on a GPU machine: the CUDA backend did not open"; status=1
  fi
fi

if [ -n "$memcheck_pid" ]; then
  wait "$memcheck_pid"
  grep "ERROR SUMMARY" "$out/memcheck.log" | tail -1
  [ "$(cat "$pdir/memcheck.rc")" = 0 ] || { echo "gpu-check: memcheck failed (exit $(cat "$pdir/memcheck.rc"))"; tail -5 "$out/memcheck.log"; status=1; }
fi

if want bench; then
  # Most of the time to `hdb bench cuda` (a killed bench still leaves its "measured:" lines),
  # the rest to the hypernetwork's; 20 s for the summary.
  room=$(( $(left) - 20 ))
  t_cuda=$(( room * 3 / 4 < 420 ? room * 3 / 4 : 420 ))
  if [ "$t_cuda" -lt 60 ]; then
    echo "gpu-check: $(left) s left before the deadline: bench skipped"; status=1
  else
    echo "== bench (hdb bench cuda --unet, PyTorch peer on the same GPU; at most $t_cuda s)"
    t0=$SECONDS
    timeout "$t_cuda" "$bin/hdb" bench cuda --runs 20 --unet --peer-python python3 2>&1 | tee "$out/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: bench failed"; status=1; }
    echo "bench cuda: $((SECONDS - t0)) s"

    t_hyp=$(( $(left) - 20 < 240 ? $(left) - 20 : 240 ))
    if [ "$t_hyp" -lt 30 ]; then
      echo "gpu-check: $(left) s left before the deadline: hypernet bench skipped"; status=1
    else
      # Half precision (an f16 file's type on a GPU) first, then f32; each against the peer
      # in the same type.
      for dt in f16 f32; do
        echo "== bench (hdb bench hypernet --device cuda --dtype $dt, PyTorch peer on the same GPU; at most $((t_hyp / 2)) s)"
        timeout "$((t_hyp / 2))" "$bin/hdb" bench hypernet --device cuda --dtype "$dt" --runs 5 \
          --peer-python python3 2>&1 | tee "$out/bench-hypernet-$dt.log"
        [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: hypernet bench ($dt) failed"; status=1; }
      done
    fi
    # The main job end to end on the GPU: hypernetwork, identities, swaps, images.
    if [ "$(left)" -gt 60 ]; then
      echo "== hdb demo --device cuda (the built-in random model)"
      timeout $(( $(left) - 30 < 120 ? $(left) - 30 : 120 )) "$bin/hdb" demo --device cuda \
        --out "$pdir/demo" 2>&1 | tee "$out/demo.log"
      [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: demo failed"; status=1; }
    fi
  fi
fi

# Training on the GPU (issue 16): rank-relaxed finetuning steps at 512x512, then one whole
# personalization, against the PyTorch peer (diffusers + peft) on the same GPU. Not in the default phases: run it as its own call,
# `scripts/gpu-check.sh train`, once the parity phase is green.
if want train; then
  t_train=$(( $(left) - 20 < 420 ? $(left) - 20 : 420 ))
  if [ "$t_train" -lt 60 ]; then
    echo "gpu-check: $(left) s left before the deadline: train bench skipped"; status=1
  else
    echo "== train (hdb bench finetune --device cuda, PyTorch peer on the same GPU; at most $t_train s)"
    timeout "$t_train" "$bin/hdb" bench finetune --device cuda --runs 5 --peer-python python3 2>&1 |
      tee "$out/bench-finetune.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: finetune bench failed"; status=1; }
  fi
  # One whole personalization (prediction + 40 steps) against the paper's ~20 s and the peer.
  t_pers=$(( $(left) - 20 < 240 ? $(left) - 20 : 240 ))
  if [ "$t_pers" -lt 60 ]; then
    echo "gpu-check: $(left) s left before the deadline: personalize bench skipped"; status=1
  else
    echo "== personalize (hdb bench personalize --device cuda, PyTorch peer; at most $t_pers s)"
    timeout "$t_pers" "$bin/hdb" bench personalize --device cuda --peer-python python3 2>&1 |
      grep -v '^step ' | tee "$out/bench-personalize.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: personalize bench failed"; status=1; }
  fi
fi

echo
echo "== summary"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "phases: $phases"
if want parity; then
  grep -cE "^cuda-(parity|op|backend)" "$out/parity.log" | xargs echo "parity cases:"
  grep -E "gpu-check: .* failed|panicked" "$out/parity.log" || echo "parity: every test passed"
fi
if want bench; then
  if grep -q "^what " "$out/bench.log" 2>/dev/null; then awk '/^what /,0' "$out/bench.log"
  else echo "bench cut short; what it measured:"; grep "^measured:" "$out/bench.log" 2>/dev/null; fi
  grep -hE "^(hdb cuda|peer|ratio)" "$out"/bench-hypernet-*.log 2>/dev/null
  grep -E "^(render|  per denoising|swap|total)" "$out/demo.log" 2>/dev/null | sed 's/^/demo: /'
fi
if want train; then
  grep -E "^(hdb |peer|ratio)" "$out/bench-finetune.log" "$out/bench-personalize.log" 2>/dev/null
fi
want memcheck && grep "ERROR SUMMARY" "$out/memcheck.log" 2>/dev/null | tail -1 | sed 's/^/memcheck: /'
echo "gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status

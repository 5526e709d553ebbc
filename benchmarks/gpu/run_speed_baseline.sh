#!/usr/bin/env bash
# Issue 14, first GPU session: the baseline of today's per-step CUDA kernels against cuDNN, on the
# shapes the issue's targets name, before any speed change (benchmarks/NOTES-gpu.md, "First GPU
# session"). Reuses the CUDA build that issue 13's call 1 left on the warm machine (fastlstm/_C*.so,
# or build/gpu/_C*.so[.gz]); builds it (about a minute, 300 s cap) only when neither is there.
# Output tee'd as it comes to benchmarks/results/gpu-<GPU>-<UTC stamp>-speed-baseline/ and to
# $OUT/<same name>/ (5 files: run.log and each run's results.json, which holds the rows, the
# device and the flags; the CSVs stay in the results folder, and the session rewrites them from the
# JSON if it needs them).
#
#   run(command="bash benchmarks/gpu/run_speed_baseline.sh", timeout_s=300)
#
# The four runs (bench_lstm.py --budget 1: one second of timing per shape, mode and dtype):
#   default-fastrnns fastrnns, float32/bfloat16/float16, --tf32 default: torch's own flags
#                    (cudnn.allow_tf32 on, so cuDNN's float32 LSTM may use TF32 tensor cores;
#                    cuda.matmul.allow_tf32 off), the setting issue 14's targets name
#   default-batch    batch{1,4,8}-h{512,1024}, float32/bfloat16, --tf32 default
#   tf32off          fastrnns, float32, --tf32 off (exact FMA on both sides)
#   h128             h128 (cuDNN's PERSIST_STATIC_SMALL_H regime), float32/bfloat16, --tf32 default
# Exit status: 0 all ran; 1 a run failed or timed out; 2 no GPU or no CUDA build.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
T0=$SECONDS
BUDGET=${SB_BUDGET_S:-270}
left() { echo $((BUDGET - (SECONDS - T0) - 5)); }
gpu=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//')
name="gpu-${gpu:-nogpu}-$(date -u +%Y%m%dT%H%M%SZ)-speed-baseline"
dir="benchmarks/results/$name"
mkdir -p "$dir"
outdir=""
if [ -n "${OUT:-}" ]; then outdir="$OUT/$name"; mkdir -p "$outdir"; fi
log() { if [ -n "$outdir" ]; then tee -a "$dir/run.log" "$outdir/run.log"; else tee -a "$dir/run.log"; fi; }
status=0
{
  echo "command: bash benchmarks/gpu/run_speed_baseline.sh"
  echo "date: $(date -u --iso-8601=seconds)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo "no .git in this copy (commit: ${PLAN_GIT:-not given})")"
  echo "gpu: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,compute_cap,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2)"
} 2>&1 | log
if ! timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "== no CUDA GPU visible to torch: nothing run" | log
  exit 2
fi
compiled() { timeout 120 "$PY" -c 'import sys, fastlstm; sys.exit(0 if fastlstm.backend("cuda") == "compiled" else 1)' 2>/dev/null; }
if ! compiled; then
  so=$(find build/gpu -maxdepth 1 -name '_C*.so*' 2>/dev/null | head -n 1)
  if [ -n "$so" ]; then
    case $so in *.gz) gzip -dc "$so" > "fastlstm/$(basename "$so" .gz)" ;; *) cp "$so" fastlstm/ ;; esac
    echo "== using $so" | log
  fi
fi
if ! compiled; then
  arch=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  echo "== no CUDA build here: building (TORCH_CUDA_ARCH_LIST=${arch:-9.0}, timeout 300 s)" | log
  FASTLSTM_CUDA=1 TORCH_CUDA_ARCH_LIST=${arch:-9.0} MAX_JOBS=$(nproc) timeout 300 "$PY" setup.py build_ext --inplace 2>&1 | tail -n 30 | log
  compiled || { echo "== no CUDA build of fastlstm: nothing run" | log; exit 2; }
fi
# bench PART SECONDS ARGS...: one bench_lstm.py run into $dir/PART, its CSV/JSON copied to $OUT.
bench() {
  local part=$1 cap=$2 lim rc
  shift 2
  lim=$(left)
  [ "$lim" -lt "$cap" ] || lim=$cap
  if [ "$lim" -lt 15 ]; then echo "== $part: SKIPPED, no time left" | log; status=1; return; fi
  echo "== $part (timeout ${lim}s, $(date -u +%H:%M:%S)): bench_lstm.py $*" | log
  timeout -k 10 "$lim" "$PY" benchmarks/bench_lstm.py --device cuda --budget 1 --no-plot \
    --out "$dir/$part" "$@" 2>&1 | log
  rc=${PIPESTATUS[0]}
  echo "== $part rc=$rc, $((SECONDS - T0)) s" | log
  [ "$rc" -eq 0 ] || status=1
  if [ -n "$outdir" ]; then
    [ ! -f "$dir/$part/results.json" ] || cp "$dir/$part/results.json" "$outdir/$part-results.json"
  fi
}
# --filter takes one substring: "batch" selects batch{1,4,8}-h{512,1024}; fastrnns runs separately.
bench default-fastrnns 70 --filter fastrnns --tf32 default
bench default-batch 110 --filter batch --dtype float32 bfloat16 --tf32 default
bench tf32off 40 --filter fastrnns --dtype float32 --tf32 off
bench h128 40 --filter h128 --dtype float32 bfloat16 --tf32 default
echo "== done: status $status, $((SECONDS - T0)) s" | log
exit "$status"

#!/usr/bin/env bash
# Issue 14, first GPU session: build benchmarks/gpu/latency_floor.cu for the GPU present and run it
# (self-check first, then the full grid), every step under `timeout`, output tee'd as it comes to
# benchmarks/results/gpu-<GPU>-<UTC stamp>-latency-floor/ and $OUT/<same name>/ (2 files: run.log
# with the header, build, self-check and full run; latency_floor.csv). Needs nvcc and a GPU; no torch.
#
#   run(command="bash benchmarks/gpu/run_latency_floor.sh", timeout_s=180)
#
# Knobs: LF_ARCH (default: the GPU's compute capability, e.g. 90), LF_ARGS (extra arguments for the
# full run, e.g. "--steps 2000"), LF_BUDGET_S (deadline of the whole script, default 120 s).
# Exit status: the full run's (0 ok; 1 errors or CUDA failure; 2 no device; 124 timed out), or the
# build's / self-check's when those fail (the full run is then skipped).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
T0=$SECONDS
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
BUDGET=${LF_BUDGET_S:-120}
left() { echo $((BUDGET - (SECONDS - T0) - 5)); }
gpu=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//')
name="gpu-${gpu:-nogpu}-$(date -u +%Y%m%dT%H%M%SZ)-latency-floor"
dir="benchmarks/results/$name"
mkdir -p "$dir"
outdir=""
if [ -n "${OUT:-}" ]; then outdir="$OUT/$name"; mkdir -p "$outdir"; fi
# log FILE: stdin to stdout and FILE in both folders, line by line.
log() { if [ -n "$outdir" ]; then tee -a "$dir/$1" "$outdir/$1"; else tee -a "$dir/$1"; fi; }
{
  echo "command: bash benchmarks/gpu/run_latency_floor.sh (LF_ARCH=${LF_ARCH:-} LF_ARGS=${LF_ARGS:-})"
  echo "date: $(date -u --iso-8601=seconds)"
  echo "host: $(hostname 2>/dev/null) $(uname -srm) nproc=$(nproc)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo "no .git in this copy (commit: ${PLAN_GIT:-not given})")"
  echo "source sha256: $(sha256sum benchmarks/gpu/latency_floor.cu | cut -c1-16)"
  echo "gpu: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2)"
  echo "nvcc: $("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*' || echo 'not found')"
} 2>&1 | log run.log
arch=${LF_ARCH:-$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.[:space:]')}
arch=${arch:-90}
bin=build/latency_floor_sm$arch
mkdir -p build
echo "== build (sm_$arch, timeout 120 s)" | log run.log
timeout 120 "$NVCC" -O3 -std=c++17 -arch=sm_$arch -Xptxas -v -o "$bin" benchmarks/gpu/latency_floor.cu 2>&1 | log run.log
rc=${PIPESTATUS[0]}
echo "== build rc=$rc, $((SECONDS - T0)) s" | log run.log
[ "$rc" -eq 0 ] || exit "$rc"
echo "== self-check (timeout 30 s)" | log run.log
timeout -k 5 30 "$bin" --check 2>&1 | log run.log
rc=${PIPESTATUS[0]}
echo "== self-check rc=$rc, $((SECONDS - T0)) s" | log run.log
[ "$rc" -eq 0 ] || exit "$rc"
lim=$(left)
[ "$lim" -ge 10 ] || { echo "== full run: no time left" | log run.log; exit 124; }
csv="$dir/latency_floor.csv"
echo "== full run (timeout ${lim} s)" | log run.log
# shellcheck disable=SC2086  # LF_ARGS is a list of arguments
timeout -k 5 "$lim" "$bin" --csv "$csv" ${LF_ARGS:-} 2>&1 | log run.log
rc=${PIPESTATUS[0]}
[ -z "$outdir" ] || [ ! -f "$csv" ] || cp "$csv" "$outdir/"
echo "== full run rc=$rc, $((SECONDS - T0)) s" | log run.log
exit "$rc"

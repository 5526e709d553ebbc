#!/usr/bin/env bash
# Builds one standalone CUDA program, research/gpu/<name>.cu, for the GPU present and runs it:
# --check first, then the full grid, every step under `timeout`, output tee'd as it comes to
# benchmarks/results/gpu-<GPU>-<UTC stamp>-<name with dashes>/ and $OUT/<same name>/ (2 files:
# run.log with the header, build, check and full run; <name>.csv). Needs nvcc and a GPU; no torch.
# Called by run_latency_floor.sh and run_persistent_prototype.sh, which document their knobs:
#   bash research/gpu/standalone.sh NAME KNOB_PREFIX CHECK_FAILURE_CONTINUES(0|1)
# Knobs, read as <KNOB_PREFIX>_ARCH, _ARGS and _BUDGET_S (see the callers).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
prog=$1 prefix=$2 continue_after_check=$3
arch_var=${prefix}_ARCH args_var=${prefix}_ARGS budget_var=${prefix}_BUDGET_S
T0=$SECONDS
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
BUDGET=${!budget_var:-120}
left() { echo $((BUDGET - (SECONDS - T0) - 5)); }
gpu=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//')
name="gpu-${gpu:-nogpu}-$(date -u +%Y%m%dT%H%M%SZ)-${prog//_/-}"
dir="benchmarks/results/$name"
mkdir -p "$dir"
outdir=""
if [ -n "${OUT:-}" ]; then outdir="$OUT/$name"; mkdir -p "$outdir"; fi
# log FILE: stdin to stdout and FILE in both folders, line by line.
log() { if [ -n "$outdir" ]; then tee -a "$dir/$1" "$outdir/$1"; else tee -a "$dir/$1"; fi; }
{
  echo "command: bash research/gpu/run_$prog.sh ($arch_var=${!arch_var:-} $args_var=${!args_var:-})"
  echo "date: $(date -u --iso-8601=seconds)"
  echo "host: $(hostname 2>/dev/null) $(uname -srm) nproc=$(nproc)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo "no .git in this copy (commit: ${PLAN_GIT:-not given})")"
  echo "source sha256: $(sha256sum "research/gpu/$prog.cu" | cut -c1-16)"
  echo "gpu: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2)"
  echo "nvcc: $("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*' || echo 'not found')"
} 2>&1 | log run.log
arch=${!arch_var:-$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.[:space:]')}
arch=${arch:-90}
bin=build/${prog}_sm$arch
mkdir -p build
echo "== build (sm_$arch, timeout 120 s)" | log run.log
timeout 120 "$NVCC" -O3 -std=c++17 -arch=sm_$arch -Xptxas -v -o "$bin" "research/gpu/$prog.cu" 2>&1 | log run.log
rc=${PIPESTATUS[0]}
echo "== build rc=$rc, $((SECONDS - T0)) s" | log run.log
[ "$rc" -eq 0 ] || exit "$rc"
echo "== self-check (timeout 30 s)" | log run.log
timeout -k 5 30 "$bin" --check 2>&1 | log run.log
rc=${PIPESTATUS[0]}
echo "== self-check rc=$rc, $((SECONDS - T0)) s" | log run.log
# A failed numerical check (1) may still be worth the full run's table; a crash or no device is not.
[ "$rc" -eq 0 ] || { [ "$continue_after_check" = 1 ] && [ "$rc" -eq 1 ]; } || exit "$rc"
lim=$(left)
[ "$lim" -ge 10 ] || { echo "== full run: no time left" | log run.log; exit 124; }
csv="$dir/$prog.csv"
echo "== full run (timeout ${lim} s)" | log run.log
# shellcheck disable=SC2086  # the ARGS knob is a list of arguments
timeout -k 5 "$lim" "$bin" --csv "$csv" ${!args_var:-} 2>&1 | log run.log
rc=${PIPESTATUS[0]}
[ -z "$outdir" ] || [ ! -f "$csv" ] || cp "$csv" "$outdir/"
echo "== full run rc=$rc, $((SECONDS - T0)) s" | log run.log
exit "$rc"

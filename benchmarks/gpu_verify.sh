#!/usr/bin/env bash
# Builds fastlstm with its CUDA ops and verifies them on this machine's GPU: the whole test suite,
# then compute-sanitizer memcheck and racecheck on a small workload (benchmarks/sanitize_small.py).
# Each raw log goes to benchmarks/results/gpu-<gpu name>-<date>/ and, when $OUT is set, to
# $OUT/gpu-<gpu name>-<date>/ as well. Every step runs even if an earlier one failed; the exit status
# is non-zero if any did, and summary.txt says which.
#
#   bash benchmarks/gpu_verify.sh
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=16 bash benchmarks/gpu_verify.sh
set -uo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu_verify.sh: nvidia-smi not found; no GPU here" >&2; exit 2; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -cs 'A-Za-z0-9._' '-' | sed 's/-*$//')
stamp=$(date -u +%Y%m%d-%H%M%S)
dir="benchmarks/results/gpu-${gpu}-${stamp}"
mkdir -p "$dir"
echo "gpu_verify.sh: logs in $dir"

# Build only for this GPU unless told otherwise (setup.py's default is 8.0 and 9.0).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

{
  echo "date: $(date -u --iso-8601=seconds)"
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo
  nvidia-smi
} > "$dir/env.txt" 2>&1
cat "$dir/env.txt"

status=0
summary=()
step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$dir/$log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc ($((SECONDS - t0)) s, $log)")
  echo "   rc=$rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
  return $rc
}

if step build build.log env FASTLSTM_CUDA=1 pip install --no-build-isolation -v -e .; then
  step pytest pytest.log python -m pytest -v -ra tests/
  tail -n 5 "$dir/pytest.log"
  # Without the caching allocator every tensor is its own allocation, so memcheck sees accesses
  # past the end of one.
  step memcheck memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 \
    python benchmarks/sanitize_small.py
  step racecheck racecheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 \
    python benchmarks/sanitize_small.py
else
  tail -n 30 "$dir/build.log"
fi

printf '%s\n' "${summary[@]}" | tee "$dir/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$(basename "$dir")"
  cp "$dir"/* "$OUT/$(basename "$dir")/"
fi
exit $status

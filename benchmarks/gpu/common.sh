# shellcheck shell=bash
# Sourced by run1_build_and_test.sh and run2_sanitize.sh (not run on its own). Bash only.
#
# What it gives the run scripts:
#   - plan_init STAGE: the log folder, the header (GPU, driver, versions, date, commit, command);
#   - step NAME LOG SECONDS CMD...: runs CMD under `timeout`, its output tee'd as it goes to the
#     log folder and to $OUT (so a call killed at the device tool's limit still returns the logs);
#   - a deadline: the whole stage ends by PLAN_BUDGET_S seconds after it started (each run script
#     sets its default, inside the device tool's 600-second limit per call), each step's timeout cut
#     to what is left;
#   - build_cuda: builds the CUDA ops in place (or reuses a build of the same sources, see there).
#
# Logs: benchmarks/results/gpu-<GPU name>-<UTC stamp>-<stage>/ and, when $OUT is set,
# $OUT/<same name>/ (the device tool returns at most 8 files from $OUT, at most 2 folders down,
# so each stage writes at most 8 files there).

PY=${PYTHON:-python3}
PLAN_BUDGET_S=${PLAN_BUDGET_S:-540}
PLAN_T0=$SECONDS
PLAN_STATUS=0
PLAN_SUMMARY=()

# Seconds left before the stage's deadline.
plan_left() { echo $((PLAN_BUDGET_S - (SECONDS - PLAN_T0))); }

# The GPU's name as a file-name piece ("NVIDIA-H200"), or "nogpu".
plan_gpu_name() {
  local n=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  fi
  n=$(printf '%s' "$n" | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//')
  echo "${n:-nogpu}"
}

# plan_init STAGE: sets PLAN_DIR (and PLAN_OUT when $OUT is set), writes header.txt.
plan_init() {
  local stage=$1
  PLAN_STAGE=$stage
  PLAN_NAME="gpu-$(plan_gpu_name)-$(date -u +%Y%m%dT%H%M%SZ)-$stage"
  PLAN_DIR="benchmarks/results/$PLAN_NAME"
  mkdir -p "$PLAN_DIR"
  PLAN_OUT=""
  if [ -n "${OUT:-}" ]; then
    PLAN_OUT="$OUT/$PLAN_NAME"
    mkdir -p "$PLAN_OUT"
  fi
  plan_header | plan_tee header.txt
}

# plan_tee FILE: stdin to stdout, PLAN_DIR/FILE and PLAN_OUT/FILE, line by line as it comes.
plan_tee() {
  if [ -n "$PLAN_OUT" ]; then tee "$PLAN_DIR/$1" "$PLAN_OUT/$1"; else tee "$PLAN_DIR/$1"; fi
}

plan_header() {
  echo "command: ${PLAN_COMMAND:-$0}"
  echo "date: $(date -u --iso-8601=seconds)"
  echo "host: $(hostname 2>/dev/null) $(uname -srm) nproc=$(nproc)"
  # The tree's commit and changes (leaving out the logs this plan writes). The device tool's copy of
  # the tree may come without .git: then PLAN_GIT (set by the caller) names the commit, and the
  # sources hash (as in build/gpu/stamp.txt) ties the logs to the sources either way.
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "git: $(git rev-parse HEAD) ($(git status --porcelain -- . ':!benchmarks/results' | wc -l) changed files)"
    git status --short -- . ':!benchmarks/results' | head -n 20 | sed 's/^/  /'
  else
    echo "git: no .git in this copy of the tree; commit given by the caller: ${PLAN_GIT:-not given}"
  fi
  echo "sources hash (setup.py, csrc/, torch version, arch list): $(plan_source_hash)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 4)"
  else
    echo "gpu: nvidia-smi not found (no GPU here)"
  fi
  echo "nvcc: $(command -v nvcc >/dev/null 2>&1 && nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo 'not found')"
  echo "compute-sanitizer: $(command -v compute-sanitizer 2>/dev/null || echo 'not on PATH')"
  timeout 60 "$PY" - <<'EOF' 2>&1
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda,
          "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None,
          "gpu available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB")
except Exception as e:  # the header must be written whatever the environment lacks
    print("torch: import failed:", repr(e))
EOF
  echo "env: MAX_JOBS=${MAX_JOBS:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} PLAN_BUDGET_S=$PLAN_BUDGET_S"
}

# True when torch sees a CUDA GPU (bounded: a broken driver can hang the first CUDA call).
plan_have_gpu() {
  timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

# step NAME LOG SECONDS CMD...: run CMD with a timeout of min(SECONDS, time left - 10), its output
# appended to LOG as it comes. Returns CMD's status (124 on timeout; 125 when no time was left).
step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local left limit t0=$SECONDS rc
  left=$(( $(plan_left) - 10 ))
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: SKIPPED, no time left before the stage's deadline" | plan_tee_append "$log"
    PLAN_SUMMARY+=("$name: SKIPPED (no time left)")
    PLAN_STATUS=1
    return 125
  fi
  {
    echo "== $name (timeout ${limit}s, $(date -u +%H:%M:%S)): $*"
  } | plan_tee_append "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | plan_tee_append "$log"
  rc=${PIPESTATUS[0]}
  local what="rc=$rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT after ${limit}s (rc=$rc)"; fi
  echo "== $name: $what, $((SECONDS - t0)) s" | plan_tee_append "$log"
  PLAN_SUMMARY+=("$name: $what, $((SECONDS - t0)) s ($log)")
  [ "$rc" -eq 0 ] || PLAN_STATUS=1
  return "$rc"
}

plan_tee_append() {
  if [ -n "$PLAN_OUT" ]; then tee -a "$PLAN_DIR/$1" "$PLAN_OUT/$1"; else tee -a "$PLAN_DIR/$1"; fi
}

# A note line in the summary (and on stdout).
plan_note() { PLAN_SUMMARY+=("$*"); echo "$*"; }

plan_finish() {
  {
    local verdict
    case $PLAN_STATUS in
      0) verdict=OK ;;
      2) verdict="NOT RUN (status 2: no GPU)" ;;
      3) verdict="NOT RUN (status 3: compute-sanitizer missing or refused by the device)" ;;
      *) verdict="NOT OK (status $PLAN_STATUS)" ;;
    esac
    echo "stage $PLAN_STAGE: $verdict, $((SECONDS - PLAN_T0)) s"
    printf '  %s\n' "${PLAN_SUMMARY[@]}"
    echo "logs: $PLAN_DIR${PLAN_OUT:+ and $PLAN_OUT}"
  } | plan_tee summary.txt
  exit "$PLAN_STATUS"
}

# The content hash a build is reused under: the sources, setup.py, torch's version and the arch list.
plan_source_hash() {
  {
    local f
    for f in setup.py csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh; do
      [ -f "$f" ] && { echo "== $f"; cat "$f"; }
    done
    "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null
    echo "${TORCH_CUDA_ARCH_LIST:-}"
  } | sha256sum | cut -c1-16
}

# build_cuda LOG SECONDS: FASTLSTM_CUDA=1 setup.py build_ext --inplace, unless build/gpu/ holds a
# _C.so (or _C.so.gz) built from the same sources (build/gpu/stamp.txt): either left there by run1
# on this machine (a warm machine keeps ignored build outputs) or carried back by the caller from
# run1's $OUT files (benchmarks/gpu/README.md). After a build, keeps the .so and the stamp in
# build/gpu/ and returns a gzipped copy and the stamp with the logs.
build_cuda() {
  local log=$1 cap=$2 hash so
  hash=$(plan_source_hash)
  so=$(find build/gpu -maxdepth 1 -name '_C*.so*' 2>/dev/null | head -n 1)
  if [ -n "$so" ] && [ "$(cat build/gpu/stamp.txt 2>/dev/null)" = "$hash" ]; then
    case $so in
      *.gz) gzip -dc "$so" > "fastlstm/$(basename "$so" .gz)" ;;
      *) cp "$so" fastlstm/ ;;
    esac
    plan_note "build: reused $so (sources hash $hash); no rebuild"
    echo "reused $so (sources hash $hash)" | plan_tee_append "$log"
    return 0
  fi
  [ -z "$so" ] || echo "build/gpu/ holds a build of other sources (stamp $(cat build/gpu/stamp.txt 2>/dev/null), now $hash): rebuilding" | plan_tee_append "$log"
  # pip's editable install would do the same build; build_ext --inplace needs no network and leaves
  # nothing installed, and the tests then import fastlstm from the checkout (PYTHONPATH).
  if step build "$log" "$cap" env FASTLSTM_CUDA=1 "$PY" setup.py build_ext --inplace; then
    mkdir -p build/gpu
    rm -f build/gpu/_C*.so*
    cp fastlstm/_C*.so build/gpu/
    echo "$hash" > build/gpu/stamp.txt
    so=$(find build/gpu -maxdepth 1 -name '_C*.so' | head -n 1)
    plan_note "build: $(basename "$so") $(du -h "$so" | cut -f1), sources hash $hash"
    if [ -n "$PLAN_OUT" ]; then
      # Returned (the device tool returns files up to 16 MiB) so that a later call on a fresh
      # machine can skip the build.
      gzip -1 -c "$so" > "$PLAN_OUT/$(basename "$so").gz"
      if [ "$(stat -c %s "$PLAN_OUT/$(basename "$so").gz")" -lt $((15 * 1024 * 1024)) ]; then
        cp build/gpu/stamp.txt "$PLAN_OUT/"
      else
        rm -f "$PLAN_OUT/$(basename "$so").gz"
      fi
    fi
    return 0
  fi
  return 1
}

# Build only for the GPU present, unless told otherwise.
plan_arch_list() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  fi
  export TORCH_CUDA_ARCH_LIST
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
}

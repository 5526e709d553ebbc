#!/usr/bin/env bash
# GPU plan, call 2 (benchmarks/gpu/README.md has the device-tool command): compute-sanitizer
# memcheck, racecheck, synccheck and initcheck on benchmarks/sanitize_small.py (every batch tile,
# dtype, lengths, reverse, projection, forward, inference forward and backward), scoped to our
# kernels (names containing "lstm_": lstm_forward_cell_kernel, lstm_forward_projection_kernel,
# lstm_backward_cell_kernel, lstm_backward_recurrent_kernel).
#
# First probes compute-sanitizer with a planted out-of-bounds write in a kernel named lstm_probe_oob
# (benchmarks/gpu/sanitizer_probe.py): where the device refuses it ("Device not supported", as seen
# on gVisor machines) the stage records "refused by the device" and exits 3 without building or
# running the tools; the planted error must be reported through the kernel filter, or the filter is
# dropped. Then reuses call 1's build (build/gpu/, kept on a warm machine or carried back) or
# rebuilds. The four tools run at once by default (SANITIZE_PARALLEL=0: one after
# another), each under its own timeout inside the call's deadline (PLAN_BUDGET_S, 360 s).
# Exit status: 0 every tool ran clean; 1 a tool reported errors, timed out or a step failed;
# 2 no GPU here; 3 compute-sanitizer missing or refused by the device.
#
#   bash benchmarks/gpu/run2_sanitize.sh
#   SANITIZE_TOOLS="memcheck racecheck" SANITIZE_ARGS="--dtypes float32" bash benchmarks/gpu/run2_sanitize.sh
# To exercise it without a GPU (with a stand-in compute-sanitizer on PATH that runs the program):
#   PLAN_ALLOW_NO_GPU=1 PLAN_SKIP_BUILD=1 SANITIZE_ARGS="--device cpu" bash benchmarks/gpu/run2_sanitize.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PLAN_COMMAND="bash benchmarks/gpu/run2_sanitize.sh $*"
PLAN_BUDGET_S=${PLAN_BUDGET_S:-360}
# shellcheck source=benchmarks/gpu/common.sh
source benchmarks/gpu/common.sh

read -r -a TOOLS <<<"${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}"
read -r -a extra <<<"${SANITIZE_ARGS:-}"
WORKLOAD=("$PY" benchmarks/sanitize_small.py --device cuda "${extra[@]}")

plan_arch_list
plan_init sanitize

if ! plan_have_gpu && [ "${PLAN_ALLOW_NO_GPU:-0}" != 1 ]; then
  plan_note "no CUDA GPU visible to torch: nothing to sanitize"
  PLAN_STATUS=2
  plan_finish
fi

CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$CS" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then CS=/usr/local/cuda/bin/compute-sanitizer; fi
if [ -z "$CS" ]; then
  plan_note "compute-sanitizer: NOT FOUND on this machine (not on PATH, not in /usr/local/cuda/bin)"
  PLAN_STATUS=3
  plan_finish
fi

# --- probe: version, the options this version knows, and whether the device lets it run ---------
help=$(timeout 60 "$CS" --help 2>&1 || true)
has_opt() { grep -qE -- "$1( |=|\$)" <<<"$help"; }
common=(--error-exitcode 1)
has_opt '--print-limit' && common+=(--print-limit 50)
has_opt '--show-backtrace' && common+=(--show-backtrace device)
# Our own timeouts bound the run; the default 10 s to connect to the target can be short with four
# tools starting at once.
has_opt '--launch-timeout' && common+=(--launch-timeout 120)
# Scope to our kernels: cuBLAS and torch's own kernels are not ours to check, and skipping their
# instrumentation keeps the run short. The option's name changed across versions.
filter=()
if has_opt '--kernel-name'; then filter=(--kernel-name kns=lstm_)
elif has_opt '--kernel-regex'; then filter=(--kernel-regex kns=lstm_)
elif has_opt '--filter'; then filter=(--filter kns=lstm_)
fi
{
  echo "compute-sanitizer: $CS"
  timeout 30 "$CS" --version 2>&1
  echo "kernel filter: ${filter[*]:-(none: no filter option in --help)}"
} | plan_tee_append probe.log

# Per-tool options (only those this version knows).
tool_args() {
  case $1 in
    memcheck) echo "--leak-check no" ; has_opt '--padding' && echo "--padding 64" ;;
    racecheck) has_opt '--racecheck-report' && echo "--racecheck-report all" ;;
    *) ;;
  esac
}

# The probe plants an out-of-bounds write in a kernel named lstm_probe_oob: memcheck must report
# it, through the filter. Outcomes: refused by the device; found (the filter works); not found.
probe() {  # probe NAME FILTER...: sets verdict
  local name=$1 section
  shift
  # --padding puts an invalid gap after each allocation, so the stray write cannot land in a
  # neighbouring allocation unseen.
  # shellcheck disable=SC2046
  step "$name" probe.log 120 "$CS" --tool memcheck "${common[@]}" $(tool_args memcheck) "$@" \
    "$PY" benchmarks/gpu/sanitizer_probe.py
  section=$(sed -n "/^== $name (/,\$p" "$PLAN_DIR/probe.log")
  if grep -qiE 'device not supported|error 999' <<<"$section"; then verdict=refused
  elif grep -q 'Invalid __global__ write' <<<"$section"; then verdict=found
  elif grep -q 'CuPy is not importable' <<<"$section"; then verdict=nocupy
  elif grep -q 'terminated before first instrumented API call' <<<"$section"; then verdict=noattach
  else verdict=notfound
  fi
}
status_before_probe=$PLAN_STATUS  # the probe's memcheck exits 1 when it works: not a failure
probe probe "${filter[@]}"
if [ "$verdict" = notfound ] && [ ${#filter[@]} -gt 0 ]; then
  plan_note "probe: the planted error was not reported through '${filter[*]}'; trying without a filter"
  filter=()
  probe probe-nofilter
fi
case $verdict in
  refused)
    plan_note "compute-sanitizer: REFUSED BY THE DEVICE (see probe.log); no tool was run"
    PLAN_STATUS=3
    plan_finish ;;
  noattach)
    plan_note "compute-sanitizer: could not attach: the probe made no CUDA call under it (no driver?); no tool was run"
    PLAN_STATUS=3
    plan_finish ;;
  found) plan_note "probe: memcheck reported the planted out-of-bounds write (filter: ${filter[*]:-none})" ;;
  nocupy) plan_note "probe: no CuPy, so the filter '${filter[*]:-none}' is unverified" ;;
  *)
    plan_note "probe: memcheck did NOT report the planted out-of-bounds write: results below are suspect"
    status_before_probe=1 ;;
esac
PLAN_STATUS=$status_before_probe

# Our ops: reuse call 1's build when the sources are the same, else build (about a minute).
if [ "${PLAN_SKIP_BUILD:-0}" = 1 ]; then
  plan_note "build: SKIPPED (PLAN_SKIP_BUILD=1): using whatever fastlstm/_C*.so is there"
else
  build_cuda build.log 300 || plan_finish
fi

# --- the tools --------------------------------------------------------------------------------------
# Without the caching allocator each tensor is its own allocation: memcheck sees an access past the
# end of one, and initcheck sees reads of memory nothing wrote (not recycled, already written memory).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# A finished tool's exit, its summary line(s), where its errors were (the kernel of each reported
# error: ours have "lstm_" in the name), and whether the workload finished ok.
tool_result() {
  local log="$PLAN_DIR/$1.log" ours others
  grep -E '^== [a-z]+: (rc|TIMED)' "$log" | tail -n 1 | sed 's/^== //; s/$/;/' | tr '\n' ' '
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 2 | sed 's/^=* *//; s/$/;/' | tr '\n' ' '
  ours=$(grep -cE '^=+ +at .*lstm_' "$log")
  others=$(grep -E '^=+ +at ' "$log" | grep -vc 'lstm_')
  echo -n "errors printed in our kernels: $ours, in others: $others; "
  if grep -q 'sanitize_small: ok' "$log"; then echo "workload ok"; else echo "workload did NOT finish ok"; fi
}
# Clean: the tool exited 0, its summary says 0 errors (or 0 hazards), and the workload finished ok.
# (initcheck, unfiltered, could in principle report errors in cuBLAS or torch kernels: then it is not
# clean, and tool_result's split says whose they are.)
tool_clean() {
  local log="$PLAN_DIR/$1.log"
  grep -qE "^== $1: rc=0," "$log" && grep -q 'sanitize_small: ok' "$log" &&
    grep -qE 'ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards' "$log" &&
    ! grep -qE 'ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9]' "$log"
}

run_tool() {
  local t=$1 cap=$2 scope=("${filter[@]}")
  # initcheck learns what is initialised from the writes it instruments: a filter would hide the
  # writes of cuBLAS and torch's kernels (the input projection, the copies of h0 and c0) and make
  # every read of them by our kernels look uninitialised. So it checks everything, and its errors
  # are split below into ours and others'.
  [ "$t" = initcheck ] && scope=()
  # shellcheck disable=SC2046
  step "$t" "$t.log" "$cap" "$CS" --tool "$t" "${common[@]}" "${scope[@]}" $(tool_args "$t") "${WORKLOAD[@]}"
}

if [ "${SANITIZE_PARALLEL:-1}" = 1 ]; then
  # One process per tool on the one GPU (16 cores, small workload): the wall time is the slowest
  # tool's, not the sum. Each writes its own log; the summary lines are gathered after.
  cap=$(( $(plan_left) - 20 ))
  pids=()
  for t in "${TOOLS[@]}"; do
    # shellcheck disable=SC2030,SC2031  # each tool's summary lines go through a file
    ( PLAN_SUMMARY=(); run_tool "$t" "$cap" >/dev/null; printf '%s\n' "${PLAN_SUMMARY[@]}" > "$PLAN_DIR/.$t.summary" ) &
    pids+=($!)
  done
  echo "running ${TOOLS[*]} at once (timeout ${cap}s each); logs in $PLAN_DIR"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    t=${TOOLS[$i]}
    # shellcheck disable=SC2031
    PLAN_SUMMARY+=("$(cat "$PLAN_DIR/.$t.summary" 2>/dev/null)")
    rm -f "$PLAN_DIR/.$t.summary"
  done
else
  n=${#TOOLS[@]}
  for t in "${TOOLS[@]}"; do
    run_tool "$t" $(( ($(plan_left) - 10) / n ))
    n=$((n - 1))
  done
fi

for t in "${TOOLS[@]}"; do
  if tool_clean "$t"; then verdict=CLEAN; else verdict="NOT CLEAN"; PLAN_STATUS=1; fi
  plan_note "$t: $verdict: $(tool_result "$t")"
done
plan_finish

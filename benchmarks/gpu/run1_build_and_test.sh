#!/usr/bin/env bash
# GPU plan, call 1 (benchmarks/gpu/README.md has the device-tool command): build the CUDA ops for
# the GPU present, then run ONLY the tests that need it (the CPU suite runs in CI):
#   - tests/test_cuda.py: parity with cuDNN and float64, gradcheck, opcheck, compile, CUDA graphs,
#     fp16/bf16 error bounds, bitwise determinism (in one process and across two), memory flat over
#     1000 training steps;
#   - tests/test_cuda_variants.py: the variant layer's ops (issue 29) against the float64 reference;
#   - the CUDA autocast test in tests/test_autocast.py;
#   - benchmarks/sanitize_small.py without a sanitizer (the workload call 2 runs under it: every
#     batch tile and dtype against a float64 reference), so call 2 does not find a broken workload.
# Every step runs under `timeout`, inside a deadline of PLAN_BUDGET_S (480) seconds for the whole
# call; logs are tee'd as they come to benchmarks/results/gpu-<GPU>-<stamp>-build-test/ and $OUT.
# Exit status: 0 all passed; 1 a step failed or timed out; 2 no GPU here (nothing was run).
#
#   bash benchmarks/gpu/run1_build_and_test.sh
# To exercise the steps on a machine without a GPU (they fail or skip, quickly):
#   PLAN_ALLOW_NO_GPU=1 [PLAN_SKIP_BUILD=1] bash benchmarks/gpu/run1_build_and_test.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Inductor's on-disk cache must not hand this run kernels compiled against another build.
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR
PLAN_COMMAND="bash benchmarks/gpu/run1_build_and_test.sh $*"
PLAN_BUDGET_S=${PLAN_BUDGET_S:-480}
# shellcheck source=benchmarks/gpu/common.sh
source benchmarks/gpu/common.sh

plan_arch_list
plan_init build-test

if ! plan_have_gpu; then
  plan_note "no CUDA GPU visible to torch (torch.cuda.is_available() is False or timed out)"
  if [ "${PLAN_ALLOW_NO_GPU:-0}" != 1 ]; then
    PLAN_STATUS=2
    plan_finish
  fi
fi

# Build: about a minute on 16 cores for one arch (a serial build used 68 s of CPU on the machine
# the plan was written on; MAX_JOBS parallelises across the five files only).
if [ "${PLAN_SKIP_BUILD:-0}" = 1 ]; then
  plan_note "build: SKIPPED (PLAN_SKIP_BUILD=1): testing whatever fastlstm/_C*.so is there"
fi
if [ "${PLAN_SKIP_BUILD:-0}" = 1 ] || build_cuda build.log 300; then
  # pytest-timeout (there on the GPU machine) turns a hung test into a stack dump of that test.
  timeout_args=()
  if timeout 30 "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    timeout_args=(-p timeout --timeout 240 --timeout-method thread)
  fi
  step tests tests.log 330 "$PY" -m pytest -v -rA --durations=15 -p no:cacheprovider \
    "${timeout_args[@]}" tests/test_cuda.py tests/test_cuda_variants.py \
    "tests/test_autocast.py::test_cuda_autocast_matches_torch_dtypes"
  plan_note "pytest: $(grep -E '^=+ .*(passed|failed|error|skipped).* =+$' "$PLAN_DIR/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
  # On a GPU every one of these tests must run: a skip there hides a missing build or device.
  if plan_have_gpu && grep -qE '^SKIPPED' "$PLAN_DIR/tests.log"; then
    plan_note "tests: SKIPPED tests on a GPU machine (see tests.log): counted as a failure"
    PLAN_STATUS=1
  fi
  step workload workload.log 90 "$PY" benchmarks/sanitize_small.py --device cuda
fi
plan_finish

#!/usr/bin/env bash
# Issue 14, first GPU session: build research/gpu/persistent_prototype.cu (a one-layer persistent
# LSTM forward that has NEVER RUN before this script runs it) for the GPU present and run it:
# --check first (H=256, B 1 and 8, all three math paths), then the full grid (fp32 FMA, TF32 mma,
# bf16 mma x H {256, 512, 1024} x B {1, 8, 64}, T=100), every step under `timeout`, output tee'd
# as it comes to benchmarks/results/gpu-<GPU>-<UTC stamp>-persistent-prototype/ and
# $OUT/<same name>/ (2 files: run.log with the header, build, check and full run;
# persistent_prototype.csv). Needs nvcc and a GPU; no torch. A failed numerical check (exit 1)
# does not stop the full run (its table says which configurations fail); a crash, a hang (timeout)
# or no device does.
#
#   run(command="bash research/gpu/run_persistent_prototype.sh", timeout_s=180)
#
# Knobs: PP_ARCH (default: the GPU's compute capability, e.g. 90), PP_ARGS (extra arguments for the
# full run, e.g. "--steps 2000"), PP_BUDGET_S (deadline of the whole script, default 120 s).
# Exit status: the full run's (0 ok; 1 errors or CUDA failure; 2 no device; 124 timed out), or the
# build's / self-check's when those fail (the full run is then skipped).
exec bash "$(dirname "$0")/standalone.sh" persistent_prototype PP 1

#!/usr/bin/env bash
# Issue 14, first GPU session: build research/gpu/latency_floor.cu for the GPU present and run it
# (self-check first, then the full grid), every step under `timeout`, output tee'd as it comes to
# benchmarks/results/gpu-<GPU>-<UTC stamp>-latency-floor/ and $OUT/<same name>/ (2 files: run.log
# with the header, build, self-check and full run; latency_floor.csv). Needs nvcc and a GPU; no torch.
#
#   run(command="bash research/gpu/run_latency_floor.sh", timeout_s=180)
#
# Knobs: LF_ARCH (default: the GPU's compute capability, e.g. 90), LF_ARGS (extra arguments for the
# full run, e.g. "--steps 2000"), LF_BUDGET_S (deadline of the whole script, default 120 s).
# Exit status: the full run's (0 ok; 1 errors or CUDA failure; 2 no device; 124 timed out), or the
# build's / self-check's when those fail (the full run is then skipped).
exec bash "$(dirname "$0")/standalone.sh" latency_floor LF 0

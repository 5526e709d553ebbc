#!/usr/bin/env bash
# Verifies the CUDA ops on this machine's GPU: the two stages of the GPU plan one after the other
# (benchmarks/gpu/README.md): build + the CUDA tests, then compute-sanitizer on a small workload.
# On the device tool, whose calls stop at 10 minutes, run the stages as two calls instead (the
# README has the exact commands). Exit status: the first stage's if it failed, else the second's.
#
#   bash benchmarks/gpu_verify.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
bash benchmarks/gpu/run1_build_and_test.sh
rc=$?
# Status 2 is "no GPU here": nothing more to do.
[ "$rc" -eq 2 ] && exit 2
bash benchmarks/gpu/run2_sanitize.sh
rc2=$?
[ "$rc" -ne 0 ] && exit "$rc"
exit "$rc2"

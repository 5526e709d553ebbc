#!/usr/bin/env bash
# Builds a standalone CUDA program of research/gpu with g++ against the CUDA emulator of tests/emu
# (tests/emu/host_api.h, runtime.cpp) and runs it with the arguments given: its kernels' logic on
# the CPU, no GPU and no nvcc needed. It checks logic only: the times it prints mean nothing, and
# the GPU's memory model is not modelled.
#
#   bash research/gpu/emulate.sh persistent_prototype --emu
#   FASTLSTM_EMU_SMS=16 bash research/gpu/emulate.sh latency_floor --check --threads 32 --smem-kb 0 --steps 16
#   bash research/gpu/emulate.sh /some/copy/of/latency_floor.cu --check ...   # another copy of a program
#
# FASTLSTM_EMU_DRIFT defaults to 1 here: blocks that run together leave their __syncthreads in
# random halves, so that they drift apart and a missing grid-wide barrier changes the results.
# Other knobs (tests/emu/runtime.cpp, host_api.h): FASTLSTM_EMU_SMS (SMs, default 132),
# FASTLSTM_EMU_SMEM_KB (shared memory per block, default 227), FASTLSTM_EMU_SEED,
# FASTLSTM_EMU_THREAD_ORDER and FASTLSTM_EMU_BLOCK_ORDER (forward, reverse, shuffle); CXX.
# The binary is build/emu/<name>, rebuilt when it is older than a source (another copy's gets a
# suffix). Exit status: the program's (research/gpu/README.md), or 1 when the build fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[ $# -ge 1 ] || { echo "usage: bash research/gpu/emulate.sh NAME|FILE.cu [ARGS...]" >&2; exit 3; }
case $1 in
  *.cu) src=$(cd "$(dirname "$1")" && pwd)/$(basename "$1") ;;
  *) src=$root/research/gpu/$1.cu ;;
esac
shift
[ -f "$src" ] || { echo "emulate.sh: no such program: $src" >&2; exit 3; }
name=$(basename "$src" .cu)
bin=$root/build/emu/$name
# Another copy of a program gets a binary of its own.
[ "$src" = "$root/research/gpu/$name.cu" ] || bin=$bin-$(printf '%s' "$src" | cksum | cut -d' ' -f1)
mkdir -p "$root/build/emu"
deps=("$src" "$root/research/gpu/bench_util.h" "$root/tests/emu/runtime.cpp" "$root/tests/emu/emu.h"
      "$root/tests/emu/host_api.h" "$0")
stale=0
[ -x "$bin" ] || stale=1
for d in "${deps[@]}"; do [ "$d" -nt "$bin" ] && stale=1; done
if [ "$stale" = 1 ]; then
  tmp=$(mktemp "$bin.XXXXXX")
  "${CXX:-g++}" -O1 -std=c++17 -fno-strict-aliasing -Wall -Wextra -DFASTLSTM_EMULATION \
    -I"$root/tests/emu/include" -I"$root/tests/emu" -I"$root/research/gpu" \
    -x c++ "$src" -x none "$root/tests/emu/runtime.cpp" -o "$tmp" || { rm -f "$tmp"; exit 1; }
  mv "$tmp" "$bin"
fi
FASTLSTM_EMU_DRIFT=${FASTLSTM_EMU_DRIFT:-1} exec "$bin" "$@"

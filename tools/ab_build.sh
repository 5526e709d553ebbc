#!/usr/bin/env bash
# Builds the op libraries of another commit under the op namespace `fastlstm_base` (and C++
# namespace fastlstm_base), so that they load into the same process as this checkout's and the two
# can be timed interleaved (tools/ab_time.py) or compared result by result.
#
#   bash tools/ab_build.sh REV [ISAS]     # e.g. bash tools/ab_build.sh main avx512,avx2
#
# Output: build/ab/<rev>/fastlstm/{_C,_cpu_<isa>}.abi3.so (git-ignored). Only the CPU ops are
# built (FASTLSTM_CUDA=0).
set -euo pipefail
rev=${1:?usage: ab_build.sh REV [ISAS]}
isas=${2:-avx512,avx2}
top=$(git rev-parse --show-toplevel)
py=${PYTHON:-python}
hash=$(git -C "$top" rev-parse --short "$rev")
dst="$top/build/ab/$hash"
if ls "$dst"/fastlstm/_C.abi3.so >/dev/null 2>&1; then echo "$dst"; exit 0; fi
rm -rf "$dst" && mkdir -p "$dst"
git -C "$top" archive "$hash" setup.py pyproject.toml README.md csrc fastlstm | tar -x -C "$dst"
# Op namespace, C++ namespace and the C symbols, everywhere in the sources.
find "$dst/csrc" -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu' \) -print0 |
  xargs -0 sed -i -E \
    -e 's/TORCH_LIBRARY(_FRAGMENT|_IMPL)?\(fastlstm,/TORCH_LIBRARY\1(fastlstm_base,/g' \
    -e 's/"fastlstm::/"fastlstm_base::/g' \
    -e 's/namespace fastlstm\b/namespace fastlstm_base/g' \
    -e 's/\bfastlstm::/fastlstm_base::/g' \
    -e 's/\bfastlstm_cpu_cache/fastlstm_base_cpu_cache/g'
(cd "$dst" && FASTLSTM_CUDA=0 FASTLSTM_CPU_BUILDS="$isas" MAX_JOBS=${MAX_JOBS:-2} \
   "$py" setup.py -q build_ext --inplace >build.log 2>&1) || { tail -30 "$dst/build.log"; exit 1; }
echo "$dst"

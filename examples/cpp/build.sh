#!/usr/bin/env bash
# Builds fastlstm_run against the libtorch inside the installed torch wheel (Python is used only here,
# to find it; the program itself does not use Python).   Usage: examples/cpp/build.sh [output path]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/fastlstm_run}"
read -r torch_dir abi < <(python -c \
  "import os, torch; print(os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI))")
"${CXX:-g++}" -std=c++20 -O1 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/fastlstm_run.cpp" -o "$out" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -ldl
echo "built $out"

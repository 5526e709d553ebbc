#!/usr/bin/env bash
# Compile-checks the CUDA build of fastlstm (csrc/cuda/ binding + csrc/kernels/) on a machine
# WITHOUT a GPU, against the torch the GPU machines have (2.11.0, CUDA 13.0), so that a change to
# csrc/cuda/ or csrc/kernels/ is compile-checked before device minutes are spent on it.
#
# Why a separate venv: the CPU torch wheel has no CUDA headers (c10/cuda/impl/cuda_cmake_macros.h
# is generated only in CUDA builds), so the binding cannot be compiled against it. This script makes
# a throwaway venv (default /work/cuda-venv, outside any git tree) with the CUDA torch wheel and the
# NVIDIA runtime wheels that `import torch` loads (4.0 GB installed; not part of CI). The
# shared environment's torch is never touched. The CUDA toolkit (nvcc) comes from CUDA_HOME
# (default /usr/local/cuda); no driver or GPU is needed.
#
#   bash benchmarks/gpu/compile_cuda_binding.sh setup              # create the venv (once)
#   bash benchmarks/gpu/compile_cuda_binding.sh check [CHECKOUT]   # compile-check a checkout
#
# `check` copies the checkout's tracked and untracked-not-ignored files to a temporary directory
# (so no build artefact lands in a git tree), builds there with FASTLSTM_CUDA=1, prints the
# compiler warnings and ptxas register/spill lines, and exits non-zero if the build failed.
# It also prints a warnings count; the full log is kept at $FASTLSTM_CC_LOG (default
# /tmp/fastlstm-cuda-compile-<checkout name>.log).
#
# Environment: CUDA_VENV (default /work/cuda-venv), PYTHON (interpreter for the venv; default
# python3.12 if present, else python3), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default "9.0", the H100/H200), MAX_JOBS (default 2), TORCH_VERSION (default 2.11.0).
set -euo pipefail

VENV=${CUDA_VENV:-/work/cuda-venv}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PIP_DISABLE_PIP_VERSION_CHECK=1

usage() { sed -n '2,25p' "$0" >&2; exit 2; }

setup() {
  local py=${PYTHON:-}
  if [ -z "$py" ]; then
    if command -v python3.12 >/dev/null && python3.12 -c 'import venv' 2>/dev/null; then py=python3.12; else py=python3; fi
  fi
  case "$VENV" in /work/wt/*|/work/main*) echo "refusing a venv inside a git tree: $VENV" >&2; exit 2;; esac
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $py ($($py --version))"
    "$py" -m venv "$VENV"
  fi
  local vpy="$VENV/bin/python"
  "$vpy" -m pip install -q --upgrade pip
  echo "== torch==$TORCH_VERSION (the PyPI wheel is the CUDA 13.0 build), without its dependencies"
  "$vpy" -m pip install -q --no-deps "torch==$TORCH_VERSION"
  # What `import torch` needs, read from the wheel's own metadata so the pins match: its Python
  # dependencies and the NVIDIA libraries libtorch_cuda.so links (cuDNN, cuBLAS, NCCL, ...).
  # triton (torch.compile's GPU backend) and cuda-bindings are not needed to import torch or to build.
  local meta reqs
  meta=$("$vpy" - <<'EOF'
import importlib.metadata as md
for r in md.distribution("torch").requires or []:
    req, _, marker = r.partition(";")
    if "extra ==" in marker:
        continue
    name = req.strip()
    low = name.lower()
    if low.startswith("triton") or low.startswith("cuda-bindings"):
        continue
    print(name)
EOF
)
  mapfile -t reqs <<<"$meta"
  echo "== dependencies: ${reqs[*]}"
  "$vpy" -m pip install -q "${reqs[@]}" ninja wheel numpy
  "$vpy" -c 'import torch, torch.utils.cpp_extension as c; print("torch", torch.__version__, "cuda", torch.version.cuda, "CUDA_HOME", c.CUDA_HOME)'
  echo "== venv ready: $VENV ($(du -sh "$VENV" | cut -f1))"
}

# Kernels, registers, stack frames and spills from ptxas -v output: a range, the largest, and any
# kernel with a stack frame or spills (local memory: slow).
ptxas_summary() {
  awk '
    /Compiling entry function/ { match($0, /function .[^'"'"']*/); fn = substr($0, RSTART + 10, RLENGTH - 10);
                                 match($0, /for .sm_[0-9a-z]+/); arch = substr($0, RSTART + 5, RLENGTH - 5); next }
    /bytes stack frame/ { stack[fn] = $1; spill[fn] = $5 + $9; next }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^registers/) reg[fn] = $i;
                              archs[arch] = 1; n++ }
    END {
      min = 1e9; max = 0
      for (f in reg) { if (reg[f] + 0 < min) min = reg[f] + 0; if (reg[f] + 0 > max) { max = reg[f] + 0; maxf = f } }
      a = ""; for (x in archs) a = a " " x
      printf "   %d kernel builds for%s: %d-%d registers per thread\n", n, a, min, max
      for (f in reg) if (stack[f] + 0 > 0 || spill[f] + 0 > 0) { printf "   STACK/SPILL: %s: %s bytes stack, %s bytes spilled\n", f, stack[f], spill[f]; bad++ }
      if (!bad) print "   no kernel has a stack frame or spills"
      print "   most registers: " maxf
    }' "$1" | { if command -v c++filt >/dev/null; then c++filt; else cat; fi; } |
    sed -E 's/fastlstm::cuda::\(anonymous namespace\)::|fastlstm::cuda::_GLOBAL__N__[0-9a-f_A-Za-z]*::|\(int, int, int.*$//g'
}

check() {
  local src
  src=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
  local vpy="$VENV/bin/python"
  [ -x "$vpy" ] || { echo "no venv at $VENV: run '$0 setup' first" >&2; exit 2; }
  [ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2; exit 2; }
  local log name
  name=$(basename "$src")
  tmp=$(mktemp -d "/tmp/fastlstm-cuda-compile-$name.XXXXXX")
  log=${FASTLSTM_CC_LOG:-/tmp/fastlstm-cuda-compile-$name.log}
  if [ "${FASTLSTM_CC_KEEP:-0}" = 1 ]; then
    echo "   keeping the build tree $tmp (FASTLSTM_CC_KEEP=1)"
  else
    trap 'rm -rf "$tmp"' EXIT
  fi
  # Tracked and untracked-but-not-ignored files: what the working tree holds, without build output.
  (cd "$src" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$src" && xargs -0 cp --parents -t "$tmp" 2>/dev/null || true)
  # cp --parents skips files deleted from the tree but still in the index; that is what we want.
  echo "== compile-check of $src ($(git -C "$src" rev-parse --short HEAD 2>/dev/null), $(git -C "$src" status --porcelain 2>/dev/null | wc -l) changed files) in $tmp"
  echo "   torch $("$vpy" -c 'import torch; print(torch.__version__)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'), TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}, log $log"
  local rc=0 t0=$SECONDS
  # -Xptxas=-v prints registers and spills per kernel; nvcc appends NVCC_APPEND_FLAGS to every call.
  (cd "$tmp" && env FASTLSTM_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
     MAX_JOBS="${MAX_JOBS:-2}" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:--Xptxas=-v}" \
     nice -n 5 "$vpy" setup.py build_ext --inplace) >"$log" 2>&1 || rc=$?
  # Strip colour codes (setup.py asks gcc for them) before grepping.
  sed -i 's/\x1b\[[0-9;]*[mK]//g' "$log"
  echo "== warnings and errors (compiler lines only):"
  grep -E '(warning|error)( #[0-9A-Za-z-]+)?:' "$log" | grep -v 'ptxas info' | sort -u || echo "   (none)"
  echo "== ptxas (-Xptxas=-v), per kernel:"
  ptxas_summary "$log"
  echo "== compile time per file (ninja):"
  find "$tmp/build" -name .ninja_log -exec awk -F'\t' 'NR > 1 { n = split($4, p, "/"); printf "   %6.1f s  %s\n", ($2 - $1) / 1000, p[n] }' {} \; | sort -rn
  local nwarn
  nwarn=$(grep -cE 'warning( #[0-9A-Za-z-]+)?:' "$log" || true)
  if [ $rc -eq 0 ] && ls "$tmp"/fastlstm/_C*.so >/dev/null 2>&1; then
    echo "== BUILD OK in $((SECONDS - t0)) s; $nwarn warning line(s); $(du -h "$tmp"/fastlstm/_C*.so | cut -f1) _C.so"
  else
    [ $rc -ne 0 ] || rc=1
    echo "== BUILD FAILED (rc=$rc) after $((SECONDS - t0)) s; last lines of $log:"
    tail -n 30 "$log"
  fi
  return $rc
}

case "${1:-}" in
  setup) setup ;;
  check) shift; check "$@" ;;
  *) usage ;;
esac

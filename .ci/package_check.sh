#!/usr/bin/env bash
# Packaging check (issue 28): fastlstm as a package index would serve it, built and used as a user
# would. Builds the sdist from this checkout and checks it holds every tracked file the build and the
# tests need; builds the wheel from the sdist (the one full build of this check); installs it into a
# fresh venv that has the same torch, with no index, so nothing (a CUDA torch above all) can be pulled
# in; then, outside any checkout, imports fastlstm and runs a forward and backward against
# torch.nn.LSTM; last, runs a subset of the tests from the unpacked sdist against the installed wheel.
#
# Usage: .ci/package_check.sh [work dir]   (default: a temporary one, removed at the end)
# PYTHON: the Python with torch, setuptools and wheel to build with (default: python).
# FASTLSTM_CPU_BUILDS: as in setup.py; while developing, e.g. "generic", builds and expects only that.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export MAX_JOBS=${MAX_JOBS:-2}

if [ $# -ge 1 ]; then
  work=$1
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
work=$(cd "$work" && pwd)

# The unpacked sdist's tests run against the installed wheel: module behaviour, errors and the
# first-hour cases on the installed ops; which of the shipped CPU builds is loaded (and that each
# lower one can be forced); the libraries in site-packages loaded by a C++ program without Python.
TESTS=(
  tests/test_module.py tests/test_errors.py tests/test_first_hour.py
  tests/test_cpu_dispatch.py::test_chosen_build_runs_on_this_cpu_and_is_the_best_it_can
  tests/test_cpu_dispatch.py::test_each_lower_build_can_be_forced_and_gives_the_same_results
  tests/test_cpu_dispatch.py::test_torch_capability_override_is_honoured
  tests/test_deploy.py::test_op_library_has_no_python_symbols
  tests/test_deploy.py::test_cpp_runs_traced_model_forward_and_backward
)

start=$SECONDS
step() { printf '\n-- %s (%ss)\n' "$1" "$((SECONDS - start))"; }
# Runs a command with its output in a log, shown (the end of it) only if it fails.
logged() {
  local log=$1; shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "FAILED: $*" >&2
    return 1
  fi
}

torch_version=$("$python" -c 'import torch; print(torch.__version__)')
echo "building with $("$python" -c 'import sys; print(sys.executable)'), torch $torch_version"
if ! "$python" -c 'import build' 2>/dev/null; then
  "$python" -m pip install --quiet build
fi

step "sdist"
logged "$work/sdist.log" "$python" -m build --sdist --no-isolation --outdir "$work/dist" .
sdist=$(echo "$work"/dist/fastlstm-*.tar.gz)
echo "$(basename "$sdist"): $(du -k "$sdist" | cut -f1) KiB"

step "sdist contents: every tracked file of the build and the tests; no build products or results"
"$python" - "$sdist" <<'EOF'
import subprocess, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
tracked = subprocess.run(
    ["git", "ls-files", "--", "csrc", "tests", "examples", ":(glob)benchmarks/*.py", "setup.py",
     "pyproject.toml", "README.md", "MANIFEST.in"],
    capture_output=True, text=True, check=True).stdout.split()
missing = sorted(set(tracked) - names)
unwanted = sorted(n for n in names if n.startswith(("build/", "dist/", "benchmarks/results/"))
                  or n.endswith((".so", ".o", ".pyc")))
assert tracked and not missing, f"missing from the sdist: {missing}"
assert not unwanted, f"in the sdist but should not be: {unwanted}"
print(f"{len(names)} files; all {len(tracked)} tracked files of csrc/, tests/, examples/, "
      "benchmarks/*.py and the build files are in it")
EOF

step "wheel, built from the sdist (MAX_JOBS=$MAX_JOBS)"
t0=$SECONDS
# --no-cache-dir: a wheel pip cached from an earlier sdist of the same name must not stand in for it.
logged "$work/wheel.log" "$python" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
  -w "$work/wheel" "$sdist"
wheel=$(echo "$work"/wheel/fastlstm-*.whl)
echo "$(basename "$wheel") in $((SECONDS - t0))s"

step "wheel contents"
if [ -n "${FASTLSTM_CPU_BUILDS:-}" ]; then
  isas=$FASTLSTM_CPU_BUILDS
elif [ "$(uname -m)" = x86_64 ]; then
  isas=generic,avx2,avx512
else
  isas=generic
fi
"$python" - "$wheel" "$sdist" "$isas" <<'EOF'
import os, sys, tarfile, zipfile
wheel, sdist, isas = sys.argv[1:]
names = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    sources = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
libraries = {"fastlstm/_C.abi3.so"} | {f"fastlstm/_cpu_{isa}.abi3.so" for isa in isas.split(",")}
modules = {n for n in sources if n.startswith("fastlstm/") and n.endswith(".py")}
assert libraries <= names, f"missing from the wheel: {sorted(libraries - names)}"
assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
extra = sorted(n for n in names if not n.startswith(("fastlstm/", "fastlstm-")))
assert not extra, f"the wheel installs more than the package: {extra}"
assert "-cp39-abi3-" in os.path.basename(wheel), wheel
print("libraries:", ", ".join(sorted(os.path.basename(n) for n in libraries)))
EOF

step "fresh venv with the same torch ($torch_version)"
venv=$work/venv
"$python" -m venv "$venv"
# The exact torch of the build (a +cpu one stays a +cpu one) and the test runner's own packages at
# the versions the build Python has.
pins=$("$python" -c 'import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("pytest", "hypothesis", "numpy")))')
# shellcheck disable=SC2086
logged "$work/venv.log" "$venv/bin/pip" install "torch==$torch_version" $pins

step "install the wheel (no index: its requirements must be met by what is installed)"
logged "$work/install.log" "$venv/bin/pip" install --no-index "$wheel"
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
[ "$installed" = "$torch_version" ] || { echo "torch changed to $installed" >&2; exit 1; }
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')

step "outside the checkout: import, backend, libraries, forward and backward against torch.nn.LSTM"
mkdir -p "$work/elsewhere"
(cd "$work/elsewhere" && "$venv/bin/python" - "$site" "$isas" <<'EOF'
import os, sys
import torch
import fastlstm

site, isas = sys.argv[1:]
package = os.path.join(site, "fastlstm")
assert os.path.dirname(fastlstm.__file__) == package, fastlstm.__file__
assert fastlstm.backend("cpu") == "compiled", fastlstm._loader.load_error()
paths = fastlstm.library_paths()
assert len(paths) == 2 and paths[0] == os.path.join(package, "_C.abi3.so"), paths
assert all(os.path.dirname(p) == package for p in paths), paths
assert sorted(fastlstm._loader.built_isas()) == sorted(isas.split(",")), fastlstm._loader.built_isas()

torch.manual_seed(0)
for kwargs in (dict(num_layers=2, bidirectional=True, batch_first=True), dict(proj_size=3)):
    fast = fastlstm.LSTM(5, 7, **kwargs)
    ref = torch.nn.LSTM(5, 7, **kwargs)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 6, 5)
    results = []
    for m in (fast, ref):
        xg = x.clone().requires_grad_()
        out, (h, c) = m(xg)
        (out.square().sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c, xg.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    print(f"LSTM(5, 7, {kwargs}): outputs, states and {len(results[0]) - 3} gradients match torch.nn.LSTM")
print(f"fastlstm {fastlstm.__file__}, backend cpu: compiled, CPU build in use: "
      f"{fastlstm._loader.cpu_isa()}")
print("libraries:", *paths)
EOF
)

step "tests from the unpacked sdist, against the installed wheel"
mkdir -p "$work/src"
tar xzf "$sdist" -C "$work/src"
src=$(echo "$work"/src/fastlstm-*)
# From another folder: in the sdist's own folder, `python -m pytest` and the tests' `python -c`
# subprocesses would import its fastlstm/ (the Python files without the libraries) instead of the
# installed package. The venv first on PATH: examples/cpp/build.sh finds torch's headers through
# `python`.
(cd "$work/elsewhere" && PATH="$venv/bin:$PATH" TORCHINDUCTOR_CACHE_DIR="$work/inductor" \
  "$venv/bin/python" -m pytest -p no:cacheprovider "${TESTS[@]/#/$src/}") | tee "$work/pytest.log"
grep -qF "fastlstm imported from $site/fastlstm" "$work/pytest.log" \
  || { echo "the tests did not import the installed fastlstm" >&2; exit 1; }

step "package check done"

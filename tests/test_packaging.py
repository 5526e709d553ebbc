"""The source distribution (issue 28): it holds everything the build and the tests need, and none of
the checkout's build products or recorded results. Building and installing a wheel from it takes
minutes, so .ci/package_check.sh does that once per CI run."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# What a checkout may hold that must not ship: build products and caches (MANIFEST.in).
BUILT = (".so", ".o", ".a", ".pyc", ".pyo")


def _files(folder: Path, pattern: str = "**/*") -> set[str]:
    return {
        p.relative_to(ROOT).as_posix() for p in folder.glob(pattern)
        if p.is_file() and not p.name.endswith(BUILT)
        and "__pycache__" not in p.parts and ".hypothesis" not in p.parts
    }


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("build", reason="python -m build (the `build` package) is not installed")
    out = tmp_path_factory.mktemp("sdist")
    run = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                          str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (archive,) = out.glob("fastlstm-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        top = names[0].split("/", 1)[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return {name.split("/", 1)[1] for name in names}, pkg_info


def test_sdist_holds_every_source_the_build_needs(sdist):
    files, _ = sdist
    # setup.py globs csrc/, and the sources include headers and the CUDA kernels: all of it.
    needed = _files(ROOT / "csrc") | {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    assert any(name.endswith(".h") for name in needed)
    assert any(name.startswith("csrc/kernels/") and name.endswith(".cu") for name in needed)
    assert needed <= files, sorted(needed - files)


def test_sdist_holds_the_tests_and_what_they_run(sdist):
    files, _ = sdist
    needed = (_files(ROOT / "tests") | _files(ROOT / "examples") | _files(ROOT / "benchmarks", "*.py"))
    needed.discard("examples/cpp/fastlstm_run")  # the C++ example's binary, when built in place
    assert {"tests/emu/include/cuda_runtime.h", "benchmarks/bench_lstm.py",
            "examples/char_lm.py", "examples/cpp/build.sh"} <= needed
    assert needed <= files, sorted(needed - files)


def test_sdist_leaves_out_build_products_and_recorded_results(sdist):
    files, _ = sdist
    unwanted = [name for name in files
                if name.endswith(BUILT) or name.startswith(("build/", "dist/", "benchmarks/results/"))
                or "__pycache__" in name or name == "examples/cpp/fastlstm_run"]
    assert not unwanted, unwanted


def test_sdist_requires_the_torch_it_was_built_with(sdist):
    # The op libraries use torch's C++ API, which changes between releases.
    _, pkg_info = sdist
    requires = [line.split(":", 1)[1].strip() for line in pkg_info.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires == [f"torch=={torch.__version__.split('+')[0]}"], requires

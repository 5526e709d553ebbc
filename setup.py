"""Builds the op libraries: fastlstm/_C.abi3.so (the op schemas and their autograd, and the CUDA ops
when torch is a CUDA build and a CUDA toolkit is found) and the CPU kernels once per instruction set,
fastlstm/_cpu_<isa>.abi3.so; fastlstm/_loader.py loads _C and the best CPU build this CPU runs (as
ATen's CPU_CAPABILITY dispatch does), so one build runs everywhere. They are plain shared libraries of
torch ops, not Python modules: no Python symbols (py_limited_api keeps torch_python out of the link),
so a C++ program without Python can load them too; Python loads them with torch.ops.load_library.

Environment switches:
  FASTLSTM_CUDA=1     build the CUDA ops (fails if torch or the toolkit cannot)
  FASTLSTM_CUDA=0     never build them
  (unset)             build them when torch.version.cuda is set and CUDA_HOME is found
  MAX_JOBS            parallel compile jobs (torch.utils.cpp_extension, ninja)
  TORCH_CUDA_ARCH_LIST  CUDA architectures, e.g. "8.0;9.0" (default: 8.0 and 9.0)
  FASTLSTM_CPU_ISA    the highest CPU instruction set to build: avx512 (default on x86-64), avx2 or
                      generic (portable; the only one elsewhere). At run time the same variable caps
                      the one that is used (fastlstm/_loader.py).
  FASTLSTM_CPU_BUILDS comma-separated subset of those to build (development: faster rebuilds)
  FASTLSTM_DEBUG=1    -O0 -g
"""
import glob
import os
import platform

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError as e:
    # pip's default isolated build env has no torch (pyproject.toml lists none on purpose: it could
    # pull a CUDA build): say how to build instead of a bare ImportError.
    raise ModuleNotFoundError(
        "fastlstm builds against the torch already installed: install torch first, then build "
        "without build isolation, e.g. `pip install --no-build-isolation fastlstm` or "
        "`pip wheel --no-build-isolation --no-deps .`") from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("FASTLSTM_CUDA", "").strip()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            raise RuntimeError(
                "FASTLSTM_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        return True
    return available


# Compiler flags per CPU build, lowest first; the at::vec code (gate math, packing, GEMV) follows
# CPU_CAPABILITY. These must match what fastlstm/_loader.py requires of the CPU before importing one.
CPU_ISAS = {
    "generic": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    # -Wno-maybe-uninitialized, -Wno-uninitialized: GCC 12 reports its own AVX-512 intrinsics
    # (avx512fintrin.h's _mm512_undefined_ps passthrough, used by at::vec and the gate math) as
    # uninitialized, hundreds of times; a known false positive (GCC bug 105593) that would bury real
    # warnings.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized",
               "-Wno-uninitialized"],
}


def _cpu_isas():
    """The CPU builds to make: every one up to FASTLSTM_CPU_ISA on x86-64, generic elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["generic"]
    top = os.environ.get("FASTLSTM_CPU_ISA", "avx512")
    names = list(CPU_ISAS)
    if top not in names:
        raise RuntimeError(f"FASTLSTM_CPU_ISA must be one of {names}, got {top!r}")
    isas = names[: names.index(top) + 1]
    only = os.environ.get("FASTLSTM_CPU_BUILDS")
    return [isa for isa in isas if isa in only.split(",")] if only else isas


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    debug = os.environ.get("FASTLSTM_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-fdiagnostics-color=always", "-Wno-unknown-pragmas"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"],
                  py_limited_api=True)
    exts = []
    for isa in _cpu_isas():
        exts.append(cpp_extension.CppExtension(
            f"fastlstm._cpu_{isa}",
            _sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": cxx + CPU_ISAS[isa]},
            **kwargs,
        ))
    # Schemas, autograd and CUDA host code: no CPU-specific instructions, so it loads on any CPU.
    sources = _sources("csrc/*.cpp") + _sources("csrc/autograd/*.cpp")
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/kernels/*.cu")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        exts.append(cpp_extension.CUDAExtension(
            "fastlstm._C",
            sources,
            define_macros=[("FASTLSTM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        ))
    else:
        exts.append(cpp_extension.CppExtension(
            "fastlstm._C", sources, extra_compile_args={"cxx": cxx}, **kwargs))
    return exts


class BuildExtension(cpp_extension.BuildExtension):
    """One object folder per extension: the CPU builds compile the same sources with different flags,
    and must never link one another's objects."""

    def run(self):
        # Older builds made Python extension modules, fastlstm/_C.cpython-*.so and
        # _cpu_*.cpython-*.so, which Python's import machinery would find before the libraries.
        for stale in glob.glob(os.path.join(HERE, "fastlstm", "_*.cpython-*")):
            os.remove(stale)
        super().run()

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


def _torch_requirement():
    """The torch release this build links against (see `dynamic` in pyproject.toml); its local label
    (+cpu, +cu128) is left out, so any build of that release satisfies it."""
    return f"torch=={torch.__version__.split('+')[0]}"


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=[_torch_requirement()],
    # The libraries use no Python API (py_limited_api above), so one wheel serves every CPython >= 3.9.
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)

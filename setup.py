"""Builds fastlstm/_C*.so, the op library: the CPU ops and their autograd always, the CUDA ops when
torch is a CUDA build and a CUDA toolkit is found. The library is a plain shared library of torch ops, not a Python module: it has no
Python symbols (py_limited_api keeps torch_python out of the link), so a C++ program without Python
can load it; Python loads it with torch.ops.load_library (fastlstm/_loader.py).

Environment switches:
  FASTLSTM_CUDA=1     build the CUDA ops (fails if torch or the toolkit cannot)
  FASTLSTM_CUDA=0     never build them
  (unset)             build them when torch.version.cuda is set and CUDA_HOME is found
  MAX_JOBS            parallel compile jobs (torch.utils.cpp_extension, ninja)
  TORCH_CUDA_ARCH_LIST  CUDA architectures, e.g. "8.0;9.0" (default: 8.0 and 9.0)
  FASTLSTM_CPU_ISA    avx2 (default on x86-64) or generic
  FASTLSTM_DEBUG=1    -O0 -g
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension

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


def _cpu_isa_flags():
    # The vectorised gate math uses at::vec's AVX2 path on x86-64 (fastlstm/_loader.py refuses to load
    # this build on a CPU without AVX2). FASTLSTM_CPU_ISA=generic builds portable scalar code.
    isa = os.environ.get("FASTLSTM_CPU_ISA", "avx2")
    if isa == "generic" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if isa != "avx2":
        raise RuntimeError(f"FASTLSTM_CPU_ISA must be 'avx2' or 'generic', got {isa!r}")
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    debug = os.environ.get("FASTLSTM_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-fdiagnostics-color=always", "-Wno-unknown-pragmas"] + _cpu_isa_flags()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/autograd/*.cpp")
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/kernels/*.cu")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "fastlstm._C",
            sources,
            define_macros=[("FASTLSTM_WITH_CUDA", None)],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension(
        "fastlstm._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        **kwargs,
    )


class BuildExtension(cpp_extension.BuildExtension):
    def run(self):
        # Builds before the op library made a Python extension module, fastlstm/_C.cpython-*.so,
        # which Python's import machinery would find before the new fastlstm/_C.abi3.so.
        for stale in glob.glob(os.path.join(HERE, "fastlstm", "_C.cpython-*")):
            os.remove(stale)
        super().run()


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)

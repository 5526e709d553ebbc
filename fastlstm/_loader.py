"""Loads the compiled ops when they can run here; otherwise fastlstm uses fastlstm.reference and says
so once.

The ops are plain shared libraries of torch ops with no Python entry point (so that a C++ program
without Python can load them too: examples/cpp), loaded with ``torch.ops.load_library``:
``fastlstm/_C.abi3.so`` holds the op schemas, their autograd and the CUDA kernels; the CPU kernels are
built once per instruction set (setup.py) as ``_cpu_avx512``, ``_cpu_avx2`` and ``_cpu_generic``, and
exactly one is loaded: the highest that both this CPU (its /proc/cpuinfo flags) and torch
(``torch.backends.cpu.get_cpu_capability()``, which honours ATEN_CPU_CAPABILITY) support, capped by
FASTLSTM_CPU_ISA if set. Loading a build whose instructions the CPU lacks would crash the process
with an illegal instruction, so the choice is made before any of its code runs.
"""
from __future__ import annotations

import glob
import os
import platform
import warnings

import torch

# Lowest first. Each entry: the /proc/cpuinfo flags the build's compiler flags (setup.py) assume,
# and the torch CPU capabilities under which it may run.
ISAS = {
    "generic": (frozenset(), {"DEFAULT", "AVX2", "AVX512"}),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), {"AVX2", "AVX512"}),
    "avx512": (frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}), {"AVX512"}),
}

_HERE = os.path.dirname(os.path.abspath(__file__))
_error: str | None = None
_isa: str | None = None
_paths: list[str] = []


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo, or None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def choose_isa(flags: frozenset[str] | None, torch_capability: str, requested: str | None,
               built: list[str], x86: bool = True) -> str | None:
    """The CPU build to load: the highest in `built` that the flags and torch's capability allow
    and that is not above `requested` (FASTLSTM_CPU_ISA). Unknown flags (None) allow only what
    torch's capability implies. None if nothing fits (then the reference implementation runs)."""
    names = list(ISAS)
    cap = names.index(requested) if requested in ISAS else len(names) - 1
    for name in reversed(names[: cap + 1]):
        need, capabilities = ISAS[name]
        if name not in built:
            continue
        if not x86:
            if name == "generic":
                return name
            continue
        if torch_capability not in capabilities:
            continue
        if flags is not None and not need <= flags:
            continue
        return name
    return None


def _library(name: str) -> str | None:
    found = sorted(glob.glob(os.path.join(_HERE, f"{name}.abi3.so")))
    return found[0] if found else None


def built_isas() -> list[str]:
    return [name for name in ISAS if _library(f"_cpu_{name}") is not None]


def _load() -> bool:
    global _error, _isa
    stale = glob.glob(os.path.join(_HERE, "_*.cpython-*.so"))
    if stale:
        # Python extension modules from an older build (their autograd was registered from Python,
        # which no longer happens): never load them next to the libraries.
        _error = f"{stale[0]} is from an older build of fastlstm; rebuild it"
        return False
    core = _library("_C")
    if core is None:
        _error = f"no _C.abi3.so in {_HERE}"
        return False
    requested = os.environ.get("FASTLSTM_CPU_ISA") or None
    if requested is not None and requested not in ISAS:
        warnings.warn(f"fastlstm: FASTLSTM_CPU_ISA={requested!r} is not one of {list(ISAS)}; ignored",
                      RuntimeWarning, stacklevel=3)
        requested = None
    built = built_isas()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa = choose_isa(cpu_flags(), torch.backends.cpu.get_cpu_capability(), requested, built, x86)
    if isa is None:
        _error = (f"no CPU build of fastlstm runs on this CPU (built: {built or 'none'}, torch CPU "
                  f"capability {torch.backends.cpu.get_cpu_capability()})")
        return False
    paths = [core, _library(f"_cpu_{isa}")]
    try:
        for path in paths:
            torch.ops.load_library(path)  # registers torch.ops.fastlstm.* and their kernels
    except OSError as e:
        _error = f"{type(e).__name__}: {e}"
        return False
    _isa = isa
    _paths.extend(paths)
    return True


LOADED = _load()
if not LOADED:
    warnings.warn(
        f"fastlstm: the compiled ops are not available ({_error}); using the slow plain-PyTorch "
        "reference implementation. Build them with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def load_error() -> str | None:
    """Why the compiled ops could not be loaded, or None."""
    return _error


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels in use ("avx512", "avx2" or "generic"), or None when
    they are not loaded."""
    return _isa


def library_paths() -> list[str]:
    """The op libraries loaded, in load order (the core library, then the CPU kernels chosen for this
    CPU), for C++ programs that load them (``torch.ops.load_library`` / ``dlopen``); empty if they
    were not loaded."""
    return list(_paths)


def empty_cpu_cache() -> int:
    """Frees the large CPU blocks that fastlstm keeps for reuse and returns how many bytes that was.

    The CPU kernels take their big buffers (workspaces, saved activations, outputs, gradients: from
    1 MiB) from a cache of freed blocks instead of fresh memory, so that a training or inference loop
    does not pay a page fault per 4 KiB on every call. The cache holds at most
    ``FASTLSTM_CPU_CACHE_MB`` MiB (read once, when first needed; default 256, 0 turns it off). Like
    the CUDA caching allocator's ``torch.cuda.empty_cache()``, this gives the memory back now.
    """
    return int(torch.ops.fastlstm.cpu_cache_release()) if _isa is not None else 0


def cpu_cache_bytes() -> int:
    """Bytes of freed blocks the CPU block cache holds now (see ``empty_cpu_cache``)."""
    return int(torch.ops.fastlstm.cpu_cache_bytes()) if _isa is not None else 0

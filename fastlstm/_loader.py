"""Loads the compiled ops (the library fastlstm/_C*.so) when they can run here; otherwise fastlstm
uses fastlstm.reference and says so once.

The library is a plain shared library of torch ops with no Python entry point (so that a C++ program
without Python can load it too: examples/cpp); it is found like the extension module
``fastlstm._C`` would be, and loaded with ``torch.ops.load_library``."""
from __future__ import annotations

import importlib.util
import platform
import warnings

import torch

_error: str | None = None
_path: str | None = None


def _load() -> bool:
    global _error, _path
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        # The x86 build uses AVX2 (setup.py); loading it on an older CPU would crash.
        _error = "this CPU lacks AVX2, which the compiled ops were built for"
        return False
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
        if spec is None or not spec.origin:
            raise ImportError(f"no {__package__}/_C*.so next to {__file__}")
        if not spec.origin.endswith(".abi3.so"):
            # The Python extension module that builds before the op library made (its autograd was
            # registered from Python, which no longer happens).
            raise ImportError(f"{spec.origin} is from an older build of fastlstm; rebuild it")
        torch.ops.load_library(spec.origin)  # registers torch.ops.fastlstm.*
    except (ImportError, OSError) as e:
        _error = f"{type(e).__name__}: {e}"
        return False
    _path = spec.origin
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


def library_path() -> str | None:
    """The path of the loaded op library (fastlstm/_C*.so), for C++ programs that load it
    (``torch.ops.load_library`` / ``dlopen``), or None if it was not loaded."""
    return _path

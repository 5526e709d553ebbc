"""Loads the compiled ops (fastlstm._C) when they can run here; otherwise fastlstm uses
fastlstm.reference and says so once."""
from __future__ import annotations

import platform
import warnings

import torch

_error: str | None = None


def _load() -> bool:
    global _error
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        # The x86 build uses AVX2 (setup.py); loading it on an older CPU would crash.
        _error = "this CPU lacks AVX2, which the compiled ops were built for"
        return False
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastlstm.*)
    except ImportError as e:
        _error = f"{type(e).__name__}: {e}"
        return False
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

"""Python side of the ops: the one-layer wrapper, fake (meta) implementations for torch.compile,
autocast, and a vmap batching rule. Autograd is registered in C++ (csrc/autograd/lstm_autograd.cpp),
so that it also exists in a C++ program without Python."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import reference
from ._loader import LOADED

_FORWARD = "fastlstm::lstm_layer_forward"
_BACKWARD = "fastlstm::lstm_layer_backward"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_warned_devices: set[str] = set()


def _has_kernel(device_type: str) -> bool:
    if not LOADED:
        return False
    if device_type == "meta":
        return True  # shapes only, from the fake implementations below
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD, key)


# Kernels register when fastlstm._C loads, so this is fixed from import on (and, being a plain dict,
# is something torch.compile can read without a graph break).
_COMPILED = {device_type: _has_kernel(device_type) for device_type in ("cpu", "cuda", "meta")}


def backend(device: str | torch.device = "cpu") -> str:
    """``"compiled"`` where fastlstm runs its C++/CUDA ops on ``device``, ``"reference"`` where it
    falls back to the plain-PyTorch implementation (fastlstm.reference)."""
    return "compiled" if _COMPILED.get(torch.device(device).type, False) else "reference"


def _compiled_for(device: torch.device) -> bool:
    if _COMPILED.get(device.type, False):
        return True
    if LOADED and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"fastlstm has no compiled kernel for device type {device.type!r}; using the "
            "plain-PyTorch reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction, differentiable: returns ``(output, h_n, c_n)``.

    input [T, B, I], h0 [B, P], c0 [B, H], w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] or None,
    w_hr [P, H] or None, lengths [B] int64 on the input's device or None; see csrc/fastlstm.cpp."""
    if _compiled_for(input.device):
        # training is left to the op's Autograd kernel (None): it saves activations only when a
        # gradient is needed, also when the call is replayed from a trace or an exported program.
        out = torch.ops.fastlstm.lstm_layer_forward(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
        return out[0], out[1], out[2]
    return reference.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def _cell_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if LOADED:

    def _check_fake_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
        """check_layer_args (csrc/lstm_checks.h) for the fake kernels: the dispatcher also sends a call
        here when one argument is on meta and the others are not, so devices are checked too."""
        torch._check(input.dim() == 3, lambda: f"input must be 3-D [T, B, I], got {input.dim()}-D")
        torch._check(w_ih.dim() == 2 and w_ih.shape[0] % 4 == 0,
                     lambda: f"w_ih must be 2-D [4*hidden_size, input_size], got {list(w_ih.shape)}")
        T, B, I = input.shape
        H = w_ih.shape[0] // 4
        P = w_hr.shape[0] if w_hr is not None else H
        torch._check(input.is_floating_point(),
                     lambda: f"input must be a floating point tensor, got {input.dtype}")
        expected = {"w_ih": (w_ih, (4 * H, I)), "w_hh": (w_hh, (4 * H, P)), "h0": (h0, (B, P)),
                    "c0": (c0, (B, H))}
        if w_hr is not None:
            expected["w_hr"] = (w_hr, (P, H))
        for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            if b is not None:
                expected[name] = (b, (4 * H,))
        for name, (t, shape) in expected.items():
            torch._check(t.shape == shape,
                         lambda: f"{name} must have shape {list(shape)}, got {list(t.shape)}")
            torch._check(t.dtype == input.dtype,
                         lambda: f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")
            _check_device(name, t, input)
        if lengths is not None:
            torch._check(lengths.dtype == torch.int64,
                         lambda: f"lengths must be int64, got {lengths.dtype}")
            torch._check(lengths.shape == (B,),
                         lambda: f"lengths must have shape [{B}], got {list(lengths.shape)}")
            _check_device("lengths", lengths, input)
        return T, B, H, P

    def _check_device(name, t, input):
        torch._check(t.device == input.device,
                     lambda: f"{name} must be on the input's device {input.device}, got {t.device}")

    @torch.library.register_fake(_FORWARD)
    def _forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                      training=None):
        T, B, H, P = _check_fake_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        saved = training is True  # None below autograd: nothing saved (csrc/fastlstm.cpp)
        return (
            input.new_empty(T, B, P),
            input.new_empty(B, P),
            input.new_empty(B, H),
            input.new_empty((T, B, 4 * H) if saved else (0,)),
            input.new_empty((T, B, H) if saved else (0,), dtype=_cell_dtype(input.dtype)),
            input.new_empty(T, B, H) if saved and w_hr is not None else input.new_empty(0),
        )

    @torch.library.register_fake(_BACKWARD)
    def _backward_fake(
        grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, lengths, output, gates,
        cells, hidden, reverse,
    ):
        T, B, H, P = _check_fake_args(input, h0, c0, w_ih, w_hh, None, None, w_hr, lengths)
        # check_backward_args: the gradients and saved tensors against the forward's sizes.
        expected = {"grad_output": (grad_output, (T, B, P)), "grad_h_n": (grad_h_n, (B, P)),
                    "grad_c_n": (grad_c_n, (B, H)), "output": (output, (T, B, P)),
                    "gates": (gates, (T, B, 4 * H)), "cells": (cells, (T, B, H))}
        if w_hr is not None:
            expected["hidden"] = (hidden, (T, B, H))
        for name, (t, shape) in expected.items():
            torch._check(t.shape == shape,
                         lambda: f"{name} must have shape {list(shape)}, got {list(t.shape)}")
            _check_device(name, t, input)
        torch._check(cells.dtype == _cell_dtype(input.dtype),
                     lambda: f"cells must have dtype {_cell_dtype(input.dtype)}, got {cells.dtype}")

        # The real op returns contiguous tensors whatever the inputs' strides.
        def like(t, shape=None):
            return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device)

        return (
            like(input), like(h0), like(c0), like(w_ih), like(w_hh), like(w_ih, w_ih.shape[:1]),
            like(w_hr) if w_hr is not None else like(input, (0,)),
        )

    def _forward_vmap(info, in_dims, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                      reverse, training=None):
        # torch.vmap of the forward op. Shared weights (per-sample inputs, states or lengths): the
        # vmapped dimension N is folded into the batch, one call on [T, N*B, ...]. Batched weights
        # (an ensemble): one call per member, as vmap's own fallback would make.
        op = torch.ops.fastlstm.lstm_layer_forward.default
        n = info.batch_size
        tensors = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        dims = in_dims[:9]
        if any(d is not None for d in dims[3:8]):
            outs = [op(*(t.select(d, k) if d is not None else t for t, d in zip(tensors, dims)),
                        reverse, training) for k in range(n)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * 6

        def fold(t, d, batch_dim):
            # [..., B, ...] per sample with the vmapped dim at d -> N folded into the batch dim.
            if t is None:
                return None
            if d is None:
                t = t.unsqueeze(batch_dim).expand(*t.shape[:batch_dim], n, *t.shape[batch_dim:])
            else:
                t = t.movedim(d, batch_dim)
            return t.reshape(*t.shape[:batch_dim], -1, *t.shape[batch_dim + 2:])

        B = input.shape[1] if dims[0] is None else input.movedim(dims[0], 0).shape[2]
        out = op(fold(input, dims[0], 1), fold(h0, dims[1], 0), fold(c0, dims[2], 0), w_ih, w_hh,
                 b_ih, b_hh, w_hr, fold(lengths, dims[8], 0), reverse, training)
        output, h_n, c_n, gates, cells, hidden = out

        def unfold(t, batch_dim):
            if t.numel() == 0 and t.dim() == 1:
                return t, None  # nothing saved: the same [0] as every sample's
            return t.unflatten(batch_dim, (n, B)), batch_dim

        results = [unfold(output, 1), unfold(h_n, 0), unfold(c_n, 0), unfold(gates, 1),
                   unfold(cells, 1), unfold(hidden, 1)]
        return tuple(r for r, _ in results), tuple(d for _, d in results)

    torch.library.register_vmap(_FORWARD, _forward_vmap)

    def _register_autocast(device_type: str) -> None:
        # Like torch.library.register_autocast, but casting to the dtype of the current autocast
        # region (torch.autocast(..., dtype=...)), as torch.nn.LSTM does, rather than a fixed one.
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        op = torch.ops.fastlstm.lstm_layer_forward.default

        def cast(x, dtype):
            # Autocast's eligibility rule: floating point and not float64.
            eligible = isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64
            return x.to(dtype) if eligible else x

        @op.py_impl(getattr(torch._C.DispatchKey, key))
        def _autocast_py_impl(*args):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*(cast(a, dtype) for a in args))

        def kernel(_, *args):
            return _autocast_py_impl(*args)

        _lib.impl("lstm_layer_forward", kernel, key, with_keyset=True)

    _lib = torch.library.Library("fastlstm", "IMPL")
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_device_type)

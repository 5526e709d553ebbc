"""Python side of fastlstm's ops, and every rule about them in one place: which device has a kernel
(the probes), the differentiable wrappers of the layer and cell ops with their fallback to
fastlstm.reference, the cell-state dtype, the fake (meta) implementations that torch.compile and
torch.export trace with, the vmap rule, and autocast (the op's own kernel and torch.nn.LSTM's rule
for the module). Autograd is registered in C++ (csrc/autograd), so that it also exists in a C++
program without Python. The modules (fastlstm/lstm.py, fastlstm/cell.py) only compose these."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from . import reference
from ._loader import LOADED

_FORWARD = "fastlstm::lstm_layer_forward"
_BACKWARD = "fastlstm::lstm_layer_backward"
_CELL_FORWARD = "fastlstm::lstm_cell_forward"
_CELL_BACKWARD = "fastlstm::lstm_cell_backward"
_VARIANT_FORWARD = "fastlstm::lstm_variant_forward"
_VARIANT_BACKWARD = "fastlstm::lstm_variant_backward"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_warned_devices: set[str] = set()

LayerFn = Callable[..., "tuple[Tensor, Tensor, Tensor]"]


def _probe(op: str) -> dict[str, bool]:
    """Which device types have a kernel for ``op``. Kernels register when fastlstm._C loads, so this
    is fixed from import on (and, being a plain dict, is something torch.compile reads without a
    graph break). "meta" is served by the fake implementations below."""
    found = {"meta": LOADED}
    for device_type, key in _DISPATCH_KEYS.items():
        found[device_type] = LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    return found


_COMPILED = _probe(_FORWARD)
_CELL_COMPILED = _probe(_CELL_FORWARD)
_VARIANT_COMPILED = _probe(_VARIANT_FORWARD)


def backend(device: str | torch.device = "cpu") -> str:
    """``"compiled"`` where fastlstm runs its C++/CUDA ops on ``device``, ``"reference"`` where it
    falls back to the plain-PyTorch implementation (fastlstm.reference)."""
    return "compiled" if _COMPILED.get(torch.device(device).type, False) else "reference"


def cell_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops keep the cell state in (their saved ``cells`` / ``gates``): float32 for
    float16/bfloat16 input, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def layer_function(device: torch.device) -> LayerFn:
    """The one-layer function for ``device``, with ``lstm_layer``'s signature: the fused op where it
    has a kernel, else fastlstm.reference.lstm_layer (saying so once per device type). A module
    picks it once per forward."""
    if _COMPILED.get(device.type, False):
        return _fused_layer
    if LOADED and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"fastlstm has no compiled kernel for device type {device.type!r}; using the "
            "plain-PyTorch reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )
    return reference.lstm_layer


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
    return layer_function(input.device)(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                        reverse)


def _fused_layer(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None,
                 reverse=False):
    # training is left to the op's Autograd kernel (None): it saves activations only when a
    # gradient is needed, also when the call is replayed from a trace or an exported program.
    out = torch.ops.fastlstm.lstm_layer_forward(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return out[0], out[1], out[2]


def lstm_variant_layer(
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
    zoneout_c: Tensor | float | None = None,
    zoneout_h: Tensor | float | None = None,
    cell_clip: float | None = None,
    layer_norm: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, with the variants (zoneout, cell clipping, layer normalisation),
    differentiable (twice, too): returns ``(output, h_n, c_n)``. Arguments as fastlstm.reference's
    lstm_variant_layer (masks [T, B, H] / [T, B, P] in the cell dtype, or a float: the
    expectation). The op ``fastlstm::lstm_variant_forward`` where the device has a kernel for it,
    else the reference."""
    if not _VARIANT_COMPILED.get(input.device.type, False):
        return reference.lstm_variant_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                            reverse, zoneout_c, zoneout_h, cell_clip, layer_norm)
    zc, zc_p = _zoneout_args(zoneout_c)
    zh, zh_p = _zoneout_args(zoneout_h)
    ln = tuple(layer_norm) if layer_norm is not None else (None,) * 4
    # Activations are saved exactly when a gradient will be asked for.
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *ln))
    out = torch.ops.fastlstm.lstm_variant_forward(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, zc, zh, zc_p, zh_p,
        None if cell_clip is None else float(cell_clip), *ln, training)
    return out[0], out[1], out[2]


def _zoneout_args(z) -> tuple[Tensor | None, float]:
    # The op's (mask, constant) pair for a zoneout argument: a mask, a float, or None (off).
    if isinstance(z, Tensor):
        return z, 0.0
    return None, float(z) if z is not None else 0.0


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One differentiable LSTM step: returns ``(h, c)``.

    input [B, I], hx [B, H], cx [B, H], w_ih [4H, I], w_hh [4H, H], b_ih/b_hh [4H] or None. The
    cell op where it has a kernel; else the layer op with T = 1 (CUDA has no cell kernel: one fused
    step after the input GEMM); else fastlstm.reference.lstm_cell."""
    device_type = input.device.type
    if _CELL_COMPILED.get(device_type, False):
        h, c, _ = torch.ops.fastlstm.lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return h, c
    if _COMPILED.get(device_type, False):
        _, h, c = _fused_layer(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh)
        return h, c
    return reference.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


# ---- autocast ------------------------------------------------------------------------------------

def _autocast_eligible(dtype: torch.dtype) -> bool:
    # What autocast casts: floating point, not float64.
    return dtype.is_floating_point and dtype != torch.float64


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the enclosing ``torch.autocast`` region for ``device_type``, or None."""
    if device_type in _DISPATCH_KEYS and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(x, dtype: torch.dtype):
    """Autocast's cast: a floating-point tensor other than float64 to ``dtype``; anything else
    (float64, an integer tensor, None) as it is."""
    return x.to(dtype) if isinstance(x, Tensor) and _autocast_eligible(x.dtype) else x


def _onednn_support() -> dict[str, bool]:
    # Whether torch's oneDNN runs 16-bit LSTMs on this CPU (ATen's mkldnn_bf16_device_check and
    # mkldnn_fp16_device_check, which honour ONEDNN_MAX_CPU_ISA); fixed for the process, read once.
    if not torch.backends.mkldnn.is_available():
        return {"built": False, "bf16": False, "fp16": False}
    probes = torch.ops.mkldnn
    return {"built": True, "bf16": bool(probes._is_mkldnn_bf16_supported()),
            "fp16": bool(probes._is_mkldnn_fp16_supported())}


_ONEDNN = _onednn_support()


def torch_lstm_uses_onednn(x: Tensor, has_proj: bool) -> bool:
    """Whether torch.nn.LSTM runs ``x`` (its input, or a PackedSequence's data whose batch sizes are
    all equal) through oneDNN rather than its step-by-step ATen implementation: ATen's use_mkldnn
    (aten/src/ATen/native/RNN.cpp). The two paths differ in what autocast does, and, for a packed
    input, in what batch sizes they accept."""
    if has_proj or x.device.type != "cpu" or x.numel() == 0 or not _ONEDNN["built"]:
        return False
    if not torch.backends.mkldnn.enabled:
        return False
    return (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN["bf16"])
            or (x.dtype == torch.float16 and _ONEDNN["fp16"] and not torch.is_grad_enabled()))


def lstm_autocast_dtypes(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: list[Tensor],
    autocast: torch.dtype,
    has_proj: bool,
    num_layers: int,
    bidirectional: bool,
    onednn: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[torch.dtype, torch.dtype | None] | None:
    """torch.nn.LSTM's dtypes inside ``torch.autocast(x.device.type, dtype=autocast)``:
    ``(dtype, c_n dtype)``, where every tensor is to be cast with ``autocast_cast(t, dtype)``, the
    layers run in ``dtype``, output and h_n come back in it and c_n in its own dtype (None: as it
    comes); or None: no cast at all. Raises RuntimeError where torch.nn.LSTM raises one (mixed
    dtypes its kernels cannot multiply).

    x [T, B, I] (a PackedSequence's data padded; batch_sizes its batch sizes), hx (h_0, c_0),
    weights the module's flat weights, onednn: torch_lstm_uses_onednn of the input (of a
    PackedSequence's data). Which dtypes a PackedSequence gets depends on whether its batch sizes
    are all equal: data, on which torch.compile(fullgraph=True) stops.

    On the CPU, torch's autocast casts no LSTM op as such, only the operations inside it:
      * where it runs oneDNN (torch_lstm_uses_onednn; a PackedSequence only when all its batch
        sizes are equal), every float32/float16/bfloat16 tensor is cast to ``autocast`` and all of
        output, h_n and c_n come back in it (a float64 tensor among them is an error);
      * elsewhere (proj_size > 0, float64 or float16 input, unequal batch sizes, oneDNN off), only
        its matrix products run in ``autocast``: the gates come out in ``autocast`` (float64 if the
        module, input and h_0 are float64), the cell state c_t in the promotion of the gates' dtype
        and c_0's, and h_t in the cell state's dtype, or the gates' with a projection.
    """
    if x.device.type != "cpu":
        # CUDA keeps the rule fastlstm has always had there: a padded input runs in ``autocast``,
        # and with a projection c_n comes back float32; a packed one is not cast.
        if batch_sizes is not None:
            return None
        return autocast, torch.float32 if has_proj else None

    def cast(d: torch.dtype) -> torch.dtype:
        return autocast if _autocast_eligible(d) else d

    h0, c0 = hx[0].dtype, hx[1].dtype
    weight_dtypes = [w.dtype for w in weights]
    if onednn and (batch_sizes is None or _all_equal(batch_sizes)):
        dtypes = {cast(d) for d in (x.dtype, h0, c0, *weight_dtypes)}
        _check_autocast(len(dtypes) == 1, "oneDNN's LSTM (which torch.nn.LSTM runs this input "
                        "on) takes no float64 tensor next to float32/float16/bfloat16 ones", dtypes)
        return autocast, autocast
    gates = {cast(d) for d in (x.dtype, h0, *weight_dtypes)}
    _check_autocast(len(gates) == 1, "the matrix products of input, h_0 and weights need one dtype",
                    gates)
    gate = gates.pop()
    cell = torch.promote_types(gate, c0)
    hidden = gate if has_proj else cell
    # The projection multiplies the cell state's output at once; without one, h_t is multiplied at
    # the next step or by the next layer.
    if has_proj or x.shape[0] > 1 or num_layers > 1:
        _check_autocast(cast(cell) == gate, "the cell state (the promotion of the gates' dtype and "
                        "c_0's) must multiply with the weights", {gate, cell})
    if bidirectional and batch_sizes is not None and not _all_equal(batch_sizes):
        # The reverse direction of a packed layer concatenates its state with the initial state of
        # the sequences that join (torch.cat, which autocast promotes).
        for pair in ((hidden, h0), (cell, c0)):
            _check_autocast(_promotable(pair, autocast), "the reverse direction of a packed layer "
                            "concatenates states whose float16/bfloat16 dtypes autocast cannot "
                            "promote", set(pair))
    return hidden, cell


def _all_equal(batch_sizes: Tensor) -> bool:
    return bool((batch_sizes == batch_sizes[0]).all())


def _promotable(dtypes, autocast: torch.dtype) -> bool:
    # at::autocast::prioritize: float64 is ignored, float32 wins, else all must be ``autocast``.
    current = autocast
    for d in dtypes:
        if d == torch.float64:
            continue
        if current == torch.float32 or d == torch.float32:
            current = torch.float32
        elif not current == d == autocast:
            return False
    return True


def _check_autocast(ok: bool, why: str, dtypes) -> None:
    if not ok:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise RuntimeError(f"LSTM under autocast: {why}; got {names} (torch.nn.LSTM raises here too)")


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
            input.new_empty((T, B, H) if saved else (0,), dtype=cell_dtype(input.dtype)),
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
        torch._check(cells.dtype == cell_dtype(input.dtype),
                     lambda: f"cells must have dtype {cell_dtype(input.dtype)}, got {cells.dtype}")

        # The real op returns contiguous tensors whatever the inputs' strides.
        def like(t, shape=None):
            return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device)

        return (
            like(input), like(h0), like(c0), like(w_ih), like(w_hh), like(w_ih, w_ih.shape[:1]),
            like(w_hr) if w_hr is not None else like(input, (0,)),
        )

    @torch.library.register_fake(_CELL_FORWARD)
    def _cell_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        B, H = input.shape[0], w_ih.shape[0] // 4
        # The kernel's checks that concern shapes, with its (torch.nn.LSTMCell's) messages.
        torch._check(input.shape[1] == w_ih.shape[1], lambda: (
            f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}"))
        for label, t in enumerate((hx, cx)):
            torch._check(t.shape[0] == B, lambda: (
                f"Input batch size {B} doesn't match hidden{label} batch size {t.shape[0]}"))
            torch._check(t.shape[1] == H, lambda: (
                f"hidden{label} has inconsistent hidden_size: got {t.shape[1]}, expected {H}"))
        return (input.new_empty(B, H), input.new_empty(B, H),
                input.new_empty(B, 4 * H, dtype=cell_dtype(input.dtype)))

    @torch.library.register_fake(_CELL_BACKWARD)
    def _cell_backward_fake(grad_h, grad_c, cx, c, gates):
        return torch.empty_like(gates, memory_format=torch.contiguous_format), torch.empty(
            cx.shape, dtype=cx.dtype, device=cx.device)

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
        # The layer op inside torch.autocast: like torch.library.register_autocast, but casting
        # (autocast_cast) to the dtype of the current autocast region rather than a fixed one. The
        # module does not reach it: it casts by torch.nn.LSTM's rule (lstm_autocast_dtypes) and
        # calls the op with autocast off.
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        op = torch.ops.fastlstm.lstm_layer_forward.default

        @op.py_impl(getattr(torch._C.DispatchKey, key))
        def _autocast_py_impl(*args):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*(autocast_cast(a, dtype) for a in args))

        def kernel(_, *args):
            return _autocast_py_impl(*args)

        _lib.impl("lstm_layer_forward", kernel, key, with_keyset=True)

    _lib = torch.library.Library("fastlstm", "IMPL")
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_device_type)

    # ---- the variant layer: fakes and autograd ----------------------------------------------------

    def _variant_k(H: int, ln: bool) -> int:
        # The saved row's length (csrc/fastlstm.cpp).
        return 16 * H + 3 if ln else 7 * H

    @torch.library.register_fake(_VARIANT_FORWARD)
    def _variant_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, zoneout_c,
                              zoneout_h, zoneout_c_p, zoneout_h_p, cell_clip, ln_ih, ln_hh,
                              ln_c_weight, ln_c_bias, training):
        T, B, H, P = _check_fake_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        acc = cell_dtype(input.dtype)
        for name, m, n in (("zoneout_c", zoneout_c, H), ("zoneout_h", zoneout_h, P)):
            if m is not None:
                torch._check(m.shape == (T, B, n),
                             lambda: f"{name} must have shape [T, B, {n}], got {list(m.shape)}")
        K = _variant_k(H, ln_ih is not None)
        return (input.new_empty(T, B, P), input.new_empty(B, P), input.new_empty(B, H),
                input.new_empty((T, B, K) if training else (0,), dtype=acc))

    @torch.library.register_fake(_VARIANT_BACKWARD)
    def _variant_backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                               lengths, reverse, zoneout_c, zoneout_h, zoneout_c_p, zoneout_h_p,
                               cell_clip, ln_ih, ln_hh, ln_c_weight, ln_c_bias, output, saved):
        _check_fake_args(input, h0, c0, w_ih, w_hh, None, None, w_hr, lengths)

        def like(t, shape=None):
            return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device)

        def opt(t):
            return like(t) if t is not None else like(input, (0,))

        return (like(input), like(h0), like(c0), like(w_ih), like(w_hh), like(w_ih, w_ih.shape[:1]),
                opt(w_hr), opt(ln_ih), opt(ln_hh), opt(ln_c_weight), opt(ln_c_bias))

    _VARIANT_TENSORS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths",
                        "zoneout_c", "zoneout_h", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias")

    def _variant_setup_context(ctx, inputs, output):
        (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, zoneout_c, zoneout_h,
         zoneout_c_p, zoneout_h_p, cell_clip, ln_ih, ln_hh, ln_c_weight, ln_c_bias, training) = inputs
        torch._check(training, lambda: "fastlstm::lstm_variant_forward: backward through a call made "
                     "with training=False (nothing was saved)")
        tensors = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, zoneout_c, zoneout_h,
                   ln_ih, ln_hh, ln_c_weight, ln_c_bias)
        present = [t is not None for t in tensors]
        ctx.save_for_backward(*(t for t in tensors if t is not None), output[0], output[3])
        ctx.present = present
        ctx.scalars = (reverse, zoneout_c_p, zoneout_h_p, cell_clip)

    def _variant_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_saved):
        saved = list(ctx.saved_tensors)
        output, activations = saved[-2], saved[-1]
        it = iter(saved[:-2])
        t = dict(zip(_VARIANT_TENSORS, (next(it) if p else None for p in ctx.present)))
        reverse, zc_p, zh_p, cell_clip = ctx.scalars
        grads = [grad_output, grad_h_n, grad_c_n]
        likes = [output, t["h0"], t["c0"]]
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, likes)]
        ln = (t["ln_ih"], t["ln_hh"], t["ln_c_weight"], t["ln_c_bias"])
        if torch.is_grad_enabled():
            # Double backward (create_graph): differentiate the plain-PyTorch definition, recomputed
            # from the same inputs, so that the gradient is itself differentiable.
            return _variant_backward_composite(t, reverse, zc_p, zh_p, cell_clip, ln, grads,
                                               ctx.needs_input_grad)
        (g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr, g_ln_ih, g_ln_hh, g_ln_cw,
         g_ln_cb) = torch.ops.fastlstm.lstm_variant_backward(
            *grads, t["input"], t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["w_hr"], t["lengths"],
            reverse, t["zoneout_c"], t["zoneout_h"], zc_p, zh_p, cell_clip, *ln, output,
            activations)
        present = lambda name, g: g if t[name] is not None else None  # noqa: E731
        return (g_input, g_h0, g_c0, g_w_ih, g_w_hh, present("b_ih", g_bias), present("b_hh", g_bias),
                present("w_hr", g_w_hr), None, None, None, None, None, None, None,
                present("ln_ih", g_ln_ih), present("ln_hh", g_ln_hh),
                present("ln_c_weight", g_ln_cw), present("ln_c_bias", g_ln_cb), None)

    def _variant_backward_composite(t, reverse, zc_p, zh_p, cell_clip, ln, grads, needs):
        layer_norm = ln if ln[0] is not None else None
        zc = t["zoneout_c"] if t["zoneout_c"] is not None else (zc_p or None)
        zh = t["zoneout_h"] if t["zoneout_h"] is not None else (zh_p or None)
        names = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths", None, None,
                 None, None, None, None, "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias", None)
        wanted = [i for i, name in enumerate(names)
                  if name is not None and needs[i] and t[name] is not None]
        with torch.enable_grad():
            out = reference.lstm_variant_layer(
                t["input"], t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"],
                t["lengths"], reverse, zc, zh, cell_clip, layer_norm)
            got = torch.autograd.grad(out, [t[names[i]] for i in wanted], grads, create_graph=True,
                                      allow_unused=True, materialize_grads=True)
        result = [None] * len(names)
        for i, g in zip(wanted, got):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(_VARIANT_FORWARD, _variant_backward,
                                    setup_context=_variant_setup_context)

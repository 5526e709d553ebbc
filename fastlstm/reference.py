"""A plain-PyTorch LSTM: the oracle in tests, and the path used where the compiled ops are not
available. ``lstm_layer`` has the contract of ``torch.ops.fastlstm.lstm_layer_forward`` (see
``csrc/fastlstm.cpp``), returning only ``(output, h_n, c_n)``; ``lstm_cell`` that of
``torch.nn.LSTMCell``. Both are built on ``lstm_step``, the one plain-op recurrence of the package
(the ONNX export of a projected layer reuses it too), and are differentiable (twice, too) through
ordinary autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lstm_cell", "lstm_layer", "lstm_step", "lstm_variant_layer", "lstm_variant_step"]


def lstm_step(
    gates_x: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step from the input's share of the gates: gates_x [B, 4H] = x_t W_ih^T + b_ih + b_hh
    (gate order i, f, g, o), h [B, P], c [B, H], w_hh [4H, P], w_hr [P, H] or None. Returns the new
    h [B, P] (projected when w_hr is given) and c [B, H]."""
    i, f, g, o = (gates_x + F.linear(h, w_hh)).chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = F.linear(h_new, w_hr)
    return h_new, c_new


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One torch.nn.LSTMCell step: input [B, I], hx [B, H], cx [B, H], w_ih [4H, I], w_hh [4H, H],
    b_ih/b_hh [4H] or None. Returns (h [B, H], c [B, H])."""
    return lstm_step(_input_gates(input, w_ih, b_ih, b_hh), hx, cx, w_hh)


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
    """One layer, one direction. input [T, B, I], h0 [B, P], c0 [B, H]; returns output [T, B, P],
    h_n [B, P], c_n [B, H]. A step t >= lengths[b] leaves sequence b's state unchanged and outputs 0."""
    x = _input_gates(input, w_ih, b_ih, b_hh)
    return _recurrence(lambda t, h, c: lstm_step(x[t], h, c, w_hh, w_hr), input, h0, c0, lengths,
                       reverse)


def _recurrence(step, input: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None,
                reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    # The steps of a layer in its direction: step(t, h, c) -> (h_new, c_new); a step t >= lengths[b]
    # leaves sequence b's state unchanged and outputs 0. Returns (output, h_n, c_n).
    T, B = input.shape[0], input.shape[1]
    h, c = h0, c0
    outputs: list[Tensor] = [input.new_empty(0)] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_new, c_new = step(t, h, c)
        if lengths is None:
            h, c = h_new, c_new
            outputs[t] = h_new
        else:
            active = (lengths > t).unsqueeze(1)
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    output = torch.stack(outputs) if T > 0 else input.new_zeros(0, B, h0.shape[1])
    return output, h, c


def _input_gates(input: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    # The input's share of the gates, both biases in it: one product for all steps of a layer.
    x = F.linear(input, w_ih, b_ih)
    return x + b_hh if b_hh is not None else x


# ---- the variants: zoneout, cell clipping, layer normalisation (weight drop is the module's) ----

def lstm_variant_step(
    gates_x: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    bias: Tensor | None = None,
    w_hr: Tensor | None = None,
    zoneout_c: Tensor | float | None = None,
    zoneout_h: Tensor | float | None = None,
    cell_clip: float | None = None,
    layer_norm: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the variant LSTM (README "Variants", csrc/fastlstm.cpp's lstm_variant_forward).

    gates_x [B, 4H] = x_t W_ih^T (no bias: with layer_norm it is normalised before the bias is
    added); h [B, P]; c [B, H]; w_hh [4H, P]; bias [4H] (b_ih + b_hh) or None; w_hr [P, H] or None.
    zoneout_c / zoneout_h: None (off), a float z (evaluation: the expectation z * prev + (1 - z) *
    candidate) or a mask [B, H] / [B, P] (training: 1 keeps the previous value). cell_clip: None or
    a positive float. layer_norm: None or (g_ih [4H], g_hh [4H], g_c [H], b_c [H]). Returns the new
    (h [B, P], c [B, H])."""
    rec = F.linear(h, w_hh)
    if layer_norm is not None:
        g_ih, g_hh, g_c, b_c = layer_norm
        pre = (F.layer_norm(gates_x, gates_x.shape[-1:], eps=LAYER_NORM_EPS) * g_ih
               + F.layer_norm(rec, rec.shape[-1:], eps=LAYER_NORM_EPS) * g_hh)
    else:
        pre = gates_x + rec
    if bias is not None:
        pre = pre + bias
    i, f, g, o = pre.chunk(4, 1)
    c_cand = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if cell_clip is not None:
        c_cand = torch.clamp(c_cand, -cell_clip, cell_clip)
    if layer_norm is not None:
        cell_out = torch.tanh(F.layer_norm(c_cand, c_cand.shape[-1:], g_c, b_c, eps=LAYER_NORM_EPS))
    else:
        cell_out = torch.tanh(c_cand)
    h_cand = torch.sigmoid(o) * cell_out
    if w_hr is not None:
        h_cand = F.linear(h_cand, w_hr)
    return _zoneout(zoneout_h, h, h_cand), _zoneout(zoneout_c, c, c_cand)


LAYER_NORM_EPS = 1e-5


def _zoneout(z: Tensor | float | None, prev: Tensor, cand: Tensor) -> Tensor:
    if z is None:
        return cand
    # A mask may be in a wider dtype (the cell dtype of float16/bfloat16 input): the state keeps its own.
    return (z * prev + (1 - z) * cand).to(cand.dtype)


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
    """lstm_layer with the variants of lstm_variant_step: zoneout_c / zoneout_h a float or a mask
    [T, B, H] / [T, B, P] (row t is step t's), cell_clip, layer_norm. Returns (output, h_n, c_n)."""
    x = F.linear(input, w_ih)
    bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)

    def at(z, t):
        return z[t] if isinstance(z, Tensor) else z

    return _recurrence(
        lambda t, h, c: lstm_variant_step(x[t], h, c, w_hh, bias, w_hr, at(zoneout_c, t),
                                          at(zoneout_h, t), cell_clip, layer_norm),
        input, h0, c0, lengths, reverse)

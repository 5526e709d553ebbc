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

__all__ = ["lstm_cell", "lstm_layer", "lstm_step"]


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
    T, B = input.shape[0], input.shape[1]
    x = _input_gates(input, w_ih, b_ih, b_hh)
    h, c = h0, c0
    outputs: list[Tensor] = [input.new_empty(0)] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_new, c_new = lstm_step(x[t], h, c, w_hh, w_hr)
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

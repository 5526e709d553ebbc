"""A plain-PyTorch LSTM layer: the oracle in tests, and the path used where the compiled ops are not
available. Same contract as ``torch.ops.fastlstm.lstm_layer_forward`` (see ``csrc/fastlstm.cpp``),
returning only ``(output, h_n, c_n)``; differentiable (twice, too) through ordinary autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    x = F.linear(input, w_ih, b_ih)
    if b_hh is not None:
        x = x + b_hh
    h, c = h0, c0
    outputs: list[Tensor] = [input.new_empty(0)] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        i, f, g, o = (x[t] + F.linear(h, w_hh)).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = F.linear(h_new, w_hr)
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

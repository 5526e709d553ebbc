"""``fastlstm.LSTMCell``: ``torch.nn.LSTMCell`` for its users, one fused op per step.

It subclasses ``torch.nn.RNNCellBase`` (as ``torch.nn.LSTMCell`` does), so construction, parameters,
initialisation, ``state_dict`` and ``repr`` are torch's own. On the CPU a step is the op
``fastlstm::lstm_cell_forward`` (csrc/cpu/lstm_cell_cpu.cpp; its autograd is registered there, in
C++). On CUDA there is no dedicated cell kernel: a step runs the layer op with T = 1 (one fused step
kernel after the input GEMM). Elsewhere it falls back to torch's own LSTM cell.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from ._loader import LOADED

__all__ = ["LSTMCell", "lstm_cell"]

_CELL_FORWARD = "fastlstm::lstm_cell_forward"
_CELL_BACKWARD = "fastlstm::lstm_cell_backward"

# Fixed from import on (kernels register when fastlstm._C loads); a plain dict torch.compile reads.
_CELL_OP = {
    device_type: LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(_CELL_FORWARD, key)
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
_CELL_OP["meta"] = LOADED


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

    input [B, I], hx [B, H], cx [B, H], w_ih [4H, I], w_hh [4H, H], b_ih/b_hh [4H] or None."""
    device_type = input.device.type
    if _CELL_OP.get(device_type, False):
        h, c, _ = torch.ops.fastlstm.lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return h, c
    if ops.backend(device_type) == "compiled":
        _, h, c = ops.lstm_layer(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh)
        return h, c
    h, c = torch._VF.lstm_cell(input, (hx, cx), w_ih, w_hh, b_ih, b_hh)
    return h, c


class LSTMCell(nn.RNNCellBase):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.LSTMCell` running one fused step per call.\n\n"
        "Same arguments, parameters, state_dict, forward signature and outputs; see torch's "
        "documentation below.\n\n" + (nn.LSTMCell.__doc__ or "")
    )

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        # torch.nn.LSTMCell.forward's checks and messages; the op checks the rest with torch's.
        if input.dim() not in (1, 2):
            raise ValueError(
                f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                                device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih,
                         self.bias_hh)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def _cell_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if LOADED:

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
                input.new_empty(B, 4 * H, dtype=_cell_dtype(input.dtype)))

    @torch.library.register_fake(_CELL_BACKWARD)
    def _cell_backward_fake(grad_h, grad_c, cx, c, gates):
        return torch.empty_like(gates, memory_format=torch.contiguous_format), torch.empty(
            cx.shape, dtype=cx.dtype, device=cx.device)

"""``fastlstm.LSTMCell``: ``torch.nn.LSTMCell`` for its users, one fused op per step.

It subclasses ``torch.nn.RNNCellBase`` (as ``torch.nn.LSTMCell`` does), so construction, parameters,
initialisation, ``state_dict`` and ``repr`` are torch's own. A step is ``fastlstm.ops.lstm_cell``:
on the CPU the op ``fastlstm::lstm_cell_forward`` (csrc/cpu/cell_cpu.cpp; its autograd in
csrc/autograd/cell_autograd.cpp); on CUDA, which has
no dedicated cell kernel, the layer op with T = 1 (one fused step kernel after the input GEMM);
elsewhere fastlstm.reference's plain-PyTorch step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .ops import lstm_cell

__all__ = ["LSTMCell", "lstm_cell"]


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
        # torch.nn.LSTMCell.forward's checks and messages, in its order; the op checks the rest
        # with torch's.
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
        _check_hx_pair(hx)
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        autocast = ops.autocast_dtype(input.device.type)
        if autocast is None:
            h, c = lstm_cell(input, hx[0], hx[1], *weights)
        else:
            # torch.nn.LSTMCell's dtypes: those of one step of torch.nn.LSTM's step-by-step
            # implementation.
            dtype, _ = ops.lstm_autocast_dtypes(
                input.unsqueeze(0), hx, [w for w in weights if w is not None], autocast,
                has_proj=False, num_layers=1, bidirectional=False, onednn=False)
            input, hx, weights = (ops.autocast_cast(input, dtype),
                                  [ops.autocast_cast(t, dtype) for t in hx],
                                  [ops.autocast_cast(w, dtype) for w in weights])
            with torch.autocast(input.device.type, enabled=False):
                h, c = lstm_cell(input, hx[0], hx[1], *weights)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def _check_hx_pair(hx) -> None:
    # What torch.nn.LSTMCell's kernel call (torch._VF.lstm_cell) raises for an hx that is not a
    # pair: its argument parser's TypeError, then its own RuntimeError.
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not "
                        f"{type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")

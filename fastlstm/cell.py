"""``fastlstm.LSTMCell``: ``torch.nn.LSTMCell`` for its users, one fused op per step.

It subclasses ``torch.nn.RNNCellBase`` (as ``torch.nn.LSTMCell`` does), so construction, parameters,
initialisation, ``state_dict`` and ``repr`` are torch's own. A step is ``fastlstm.ops.lstm_cell``:
on the CPU the op ``fastlstm::lstm_cell_forward`` (csrc/cpu/cell_cpu.cpp; its autograd in
csrc/autograd/cell_autograd.cpp); on CUDA, which has
no dedicated cell kernel, the layer op with T = 1 (one fused step kernel after the input GEMM);
elsewhere fastlstm.reference's plain-PyTorch step. With a variant on (zoneout, layer_norm,
cell_clip; docs/variants.md) a step is ``fastlstm.ops.lstm_variant_layer`` with T = 1.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops, variants
from .ops import lstm_cell

__all__ = ["LSTMCell", "lstm_cell"]


class LSTMCell(nn.RNNCellBase):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.LSTMCell` running one fused step per call.\n\n"
        "Same arguments, parameters, state_dict, forward signature and outputs; see torch's "
        "documentation below.\n\n" + (nn.LSTMCell.__doc__ or "")
    )

    # The variants (docs/variants.md), off by default; class attributes, so that a module without
    # them in its __dict__ (converted by replace_lstm, or unpickled) runs the plain step.
    zoneout: float | tuple[float, float] = 0.0
    layer_norm: bool = False
    cell_clip: float | None = None

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, zoneout=0.0, layer_norm=False, cell_clip=None) -> None:
        zoneout = variants.check_zoneout(zoneout)
        layer_norm = variants.check_layer_norm(layer_norm)
        cell_clip = variants.check_cell_clip(cell_clip)
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self.zoneout, self.cell_clip = zoneout, cell_clip
        if layer_norm:
            self.layer_norm = True
            variants.add_layer_norm_parameters(self, [""], self.weight_ih)

    def reset_parameters(self) -> None:
        # torch's, then the layer-norm parameters (registered last) back to ones and zeros.
        super().reset_parameters()
        if self.layer_norm:
            variants.reset_layer_norm_parameters(self, [""])

    def extra_repr(self) -> str:
        return super().extra_repr() + variants.repr_options(self, weight_drop=False)

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
        variant = variants.options(
            self, [variants.layer_norm_parameters(self, "")] if self.layer_norm else None)
        step = lstm_cell if variant is None else _variant_step(variant)
        autocast = ops.autocast_dtype(input.device.type)
        if autocast is None:
            h, c = step(input, hx[0], hx[1], *weights)
        else:
            # torch.nn.LSTMCell's dtypes: those of one step of torch.nn.LSTM's step-by-step
            # implementation.
            dtype, _ = ops.lstm_autocast_dtypes(
                input.unsqueeze(0), hx, [w for w in weights if w is not None], autocast,
                has_proj=False, num_layers=1, bidirectional=False, onednn=False)
            input, hx, weights = (ops.autocast_cast(input, dtype),
                                  [ops.autocast_cast(t, dtype) for t in hx],
                                  [ops.autocast_cast(w, dtype) for w in weights])
            if variant is not None and variant.layer_norm is not None:
                step = _variant_step(variant._replace(layer_norm=[
                    tuple(ops.autocast_cast(t, dtype) for t in variant.layer_norm[0])]))
            with torch.autocast(input.device.type, enabled=False):
                h, c = step(input, hx[0], hx[1], *weights)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def _variant_step(variant: variants.Options):
    """lstm_cell's signature, with the variants: the variant layer op on one step (T = 1), with
    zoneout masks [1, B, H] (c's drawn first, then h's)."""
    def step(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
        B, H = input.shape[0], w_hh.shape[1]
        z_c, z_h = variant.zoneout(1, B, H, H, input)
        norm = variant.layer_norm[0] if variant.layer_norm is not None else None
        _, h, c = ops.lstm_variant_layer(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, None,
                                         None, False, z_c, z_h, variant.cell_clip, norm)
        # In the input's dtype, as lstm_cell returns them (a float32 mask promotes 16-bit ones).
        return (h if h.dtype == input.dtype else h.to(input.dtype),
                c if c.dtype == input.dtype else c.to(input.dtype))

    return step


def _check_hx_pair(hx) -> None:
    # What torch.nn.LSTMCell's kernel call (torch._VF.lstm_cell) raises for an hx that is not a
    # pair: its argument parser's TypeError, then its own RuntimeError.
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not "
                        f"{type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")

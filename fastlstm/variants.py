"""The variant options of fastlstm.LSTM and fastlstm.LSTMCell (zoneout, weight drop, layer
normalisation, cell clipping; docs/variants.md): their checks, the layer-norm parameters, and the
random masks of a training call. The math is fastlstm.reference.lstm_variant_step; the modules run
it through fastlstm.ops.lstm_variant_layer."""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

# Parameter names, suffixed like torch's own (LSTM: _l{k}{_reverse}; LSTMCell: nothing), and shapes
# in units of H: the input's and the recurrent pre-activations' gains [4H], the cell output's gain
# and bias [H].
LAYER_NORM = (("layer_norm_weight_ih", 4, 1.0), ("layer_norm_weight_hh", 4, 1.0),
              ("layer_norm_weight_c", 1, 1.0), ("layer_norm_bias_c", 1, 0.0))


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def check_zoneout(zoneout) -> float | tuple[float, float]:
    """zoneout as the module keeps it: a float, or a pair (z_c, z_h), each in [0, 1)."""
    pair = isinstance(zoneout, (tuple, list))
    values = tuple(zoneout) if pair else (zoneout,)
    if (pair and len(values) != 2) or not all(_number(z) and 0 <= z < 1 for z in values):
        raise ValueError("zoneout must be a float in [0, 1) or a pair (zoneout_c, zoneout_h) of "
                         f"floats in [0, 1), got {zoneout!r}")
    values = tuple(float(z) for z in values)
    return values if pair else values[0]


def check_weight_drop(weight_drop) -> float:
    if not (_number(weight_drop) and 0 <= weight_drop < 1):
        raise ValueError(f"weight_drop must be a float in [0, 1), got {weight_drop!r}")
    return float(weight_drop)


def check_layer_norm(layer_norm) -> bool:
    if not isinstance(layer_norm, bool):
        raise ValueError(f"layer_norm must be True or False, got {layer_norm!r}")
    return layer_norm


def check_cell_clip(cell_clip) -> float | None:
    if cell_clip is None:
        return None
    if not (_number(cell_clip) and cell_clip > 0):
        raise ValueError(f"cell_clip must be None or a positive float, got {cell_clip!r}")
    return float(cell_clip)


def zoneout_pair(zoneout: float | tuple[float, float]) -> tuple[float, float]:
    """(z_c, z_h)."""
    return zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)


def add_layer_norm_parameters(module: nn.Module, suffixes: list[str], like: Tensor) -> None:
    """Registers the layer-norm parameters for each suffix, after the module's own (so torch's
    weights draw the same values for a seed as without them), on ``like``'s device and dtype."""
    H = module.hidden_size
    for suffix in suffixes:
        for name, units, value in LAYER_NORM:
            module.register_parameter(name + suffix, nn.Parameter(
                torch.full((units * H,), value, dtype=like.dtype, device=like.device)))


def reset_layer_norm_parameters(module: nn.Module, suffixes: list[str]) -> None:
    with torch.no_grad():
        for suffix in suffixes:
            for name, _, value in LAYER_NORM:
                getattr(module, name + suffix).fill_(value)


def layer_norm_parameters(module: nn.Module, suffix: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(g_ih [4H], g_hh [4H], g_c [H], b_c [H]) for one layer and direction."""
    g_ih, g_hh, g_c, b_c = (getattr(module, name + suffix) for name, _, _ in LAYER_NORM)
    return g_ih, g_hh, g_c, b_c


def repr_options(module: nn.Module, weight_drop: bool) -> str:
    """The variant options that are on, for extra_repr."""
    s = ""
    if any(zoneout_pair(module.zoneout)):
        s += f", zoneout={module.zoneout}"
    if weight_drop and module.weight_drop != 0.0:
        s += f", weight_drop={module.weight_drop}"
    if module.layer_norm:
        s += ", layer_norm=True"
    if module.cell_clip is not None:
        s += f", cell_clip={module.cell_clip}"
    return s


class Options(NamedTuple):
    """What a forward call runs beyond the plain LSTM. layer_norm: per layer and direction (in
    torch's order of parameters: l0, l0_reverse, l1, ...) the four parameters, or None."""
    zoneout_c: float
    zoneout_h: float
    weight_drop: float
    cell_clip: float | None
    layer_norm: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None
    training: bool

    def needs_variant_op(self) -> bool:
        """Whether a layer needs ops.lstm_variant_layer (weight drop alone runs the plain op)."""
        return (self.zoneout_c > 0 or self.zoneout_h > 0 or self.cell_clip is not None
                or self.layer_norm is not None)

    def recurrent_weight(self, w_hh: Tensor) -> Tensor:
        """w_hh as this call uses it: in training with weight drop, one dropped copy for every step
        of the call (differentiable wrt w_hh); otherwise w_hh."""
        if self.training and self.weight_drop > 0:
            return F.dropout(w_hh, self.weight_drop, training=True)
        return w_hh

    def zoneout(self, T, B, H, P, like: Tensor
                ) -> tuple[Tensor | float | None, Tensor | float | None]:
        """(zoneout_c, zoneout_h) for ops.lstm_variant_layer: in training Bernoulli(z) masks
        [T, B, H] and [T, B, P] in the cell dtype (1 keeps the previous value; c's drawn first),
        in evaluation the float z (the expectation); None where z is 0."""
        def one(z, size):
            if z == 0:
                return None
            if not self.training:
                return z
            return torch.empty(T, B, size, dtype=ops.cell_dtype(like.dtype),
                               device=like.device).bernoulli_(z)

        return one(self.zoneout_c, H), one(self.zoneout_h, P)


def options(module: nn.Module, layer_norm: list | None, weight_drop: float = 0.0
            ) -> Options | None:
    """The call's Options, or None where it runs exactly the plain LSTM (no variant on, or only
    weight drop in evaluation)."""
    z_c, z_h = zoneout_pair(module.zoneout)
    if not (z_c or z_h or layer_norm or module.cell_clip is not None
            or (weight_drop and module.training)):
        return None
    return Options(z_c, z_h, weight_drop, module.cell_clip, layer_norm, module.training)

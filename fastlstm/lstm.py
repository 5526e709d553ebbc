"""``fastlstm.LSTM``: ``torch.nn.LSTM`` for its users, on fastlstm's fused ops.

It subclasses ``torch.nn.RNNBase`` (as ``torch.nn.LSTM`` does), so construction, argument checks,
parameters, initialisation, ``state_dict``, ``all_weights``, ``flatten_parameters`` and ``repr`` are
torch's own; it is deliberately *not* a ``torch.nn.LSTM`` (Dynamo refuses to compile any instance of
that class). Only ``forward`` differs: layers and directions are composed from the one-layer op
(fastlstm.ops.lstm_layer), and a PackedSequence is run through the op's per-sequence lengths.
The variants (zoneout, weight_drop, layer_norm, cell_clip; docs/variants.md) run each layer through
fastlstm.ops.lstm_variant_layer instead, or weight drop alone through the plain op with the dropped
recurrent weights; with none on, forward is the plain LSTM's.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import onnx as _onnx
from . import ops, variants
from .cell import LSTMCell

__all__ = ["LSTM", "replace_lstm"]


class LSTM(nn.RNNBase):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.LSTM` running on fastlstm's fused kernels.\n\n"
        "Same arguments, parameters, state_dict, forward signature and outputs; see torch's "
        "documentation below.\n\n" + (nn.LSTM.__doc__ or "")
    )

    # The variants (docs/variants.md), off by default. Class attributes, so that a module without
    # them in its __dict__ (converted by replace_lstm, or unpickled from before they existed) runs
    # the plain LSTM.
    zoneout: float | tuple[float, float] = 0.0
    weight_drop: float = 0.0
    layer_norm: bool = False
    cell_clip: float | None = None

    def __init__(self, *args, zoneout=0.0, weight_drop=0.0, layer_norm=False, cell_clip=None,
                 **kwargs):
        zoneout = variants.check_zoneout(zoneout)
        weight_drop = variants.check_weight_drop(weight_drop)
        layer_norm = variants.check_layer_norm(layer_norm)
        cell_clip = variants.check_cell_clip(cell_clip)
        super().__init__("LSTM", *args, **kwargs)
        self.zoneout, self.weight_drop, self.cell_clip = zoneout, weight_drop, cell_clip
        if layer_norm:
            self.layer_norm = True
            variants.add_layer_norm_parameters(self, self._layer_norm_suffixes(),
                                               self._flat_weights[0])

    def _layer_norm_suffixes(self) -> list[str]:
        # torch's order: l0, l0_reverse, l1, ...
        return [f"_l{layer}{'_reverse' if d else ''}" for layer in range(self.num_layers)
                for d in range(2 if self.bidirectional else 1)]

    def reset_parameters(self) -> None:
        # torch's (uniform for every parameter: the layer-norm ones, registered last, draw after
        # torch's), then the layer-norm parameters back to ones and zeros.
        super().reset_parameters()
        if self.layer_norm:
            variants.reset_layer_norm_parameters(self, self._layer_norm_suffixes())

    def extra_repr(self) -> str:
        return super().extra_repr() + variants.repr_options(self, weight_drop=True)

    def _variant_options(self) -> variants.Options | None:
        norms = None
        if self.layer_norm:
            norms = [variants.layer_norm_parameters(self, s) for s in self._layer_norm_suffixes()]
        return variants.options(self, norms, self.weight_drop)

    # torch.nn.LSTM's own shape checks and hidden-state permutation, so errors read the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first; without it, scripting fails deep in
        # forward's Python control flow with a message about hx's type.
        raise RuntimeError(
            "fastlstm.LSTM does not support torch.jit.script (TorchScript scripting is deprecated "
            "in this torch); use torch.jit.trace, torch.export or torch.compile instead")

    def forward(self, input, hx=None, lengths=None):  # noqa: C901 (mirrors torch.nn.LSTM.forward)
        """torch.nn.LSTM's forward, plus ``lengths``: for a padded batch (3-D ``input``), a
        tensor [B] of each sequence's length (integers in [0, T], any order, on any device). It
        gives what pack_padded_sequence -> LSTM -> pad_packed_sequence gives, without packing:
        ``output`` is zero past each length and ``h_n``/``c_n`` are each sequence's state at its
        last step (a length of 0 leaves the initial state). Unlike a PackedSequence it exports
        (torch.export, ONNX) with dynamic batch and sequence length."""
        self._update_flat_weights()
        weights = _check_weights(self._flat_weights, self._flat_weights_names)
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is not None:
            _check_hx_pair(hx)
        batch_sizes = packed_index = reverse_input = None
        sorted_indices = unsorted_indices = None
        is_batched = True
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("LSTM: lengths cannot be given with a PackedSequence input, "
                                 "which carries its own lengths")
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_batch_sizes(batch_sizes)
            autocast = ops.autocast_dtype(data.device.type)
            if autocast is None:
                # torch checks a packed input's dtype in its kernel (a RuntimeError, where
                # check_input would raise a ValueError).
                _check_dtypes(data, (), weights)
            max_batch_size = _packed_batch_size(batch_sizes)
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
                self._check_packed_forward_args(data, batch_sizes, hx, max_batch_size)
            else:
                self.check_input(data, batch_sizes)
            onednn = ops.torch_lstm_uses_onednn(data, self.proj_size > 0)
            packed_index, lengths, rows = _packed_layout(batch_sizes, max_batch_size, data, onednn)
            steps, total = batch_sizes.shape[0], data.shape[0]
            with _autocast_off(data.device.type, autocast):
                x = _pad_packed(data if rows == total else data[:rows], packed_index, steps,
                                max_batch_size)
                if self.bidirectional and rows != total:
                    # torch.nn.LSTM's reverse direction reads the rows of batch sizes that sum to
                    # fewer rows than the data from the data's end (its forward one, from the start).
                    reverse_input = _pad_packed(data[total - rows:], packed_index, steps,
                                                max_batch_size)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(batch_dim)
            if hx is not None:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            x = input.transpose(0, 1) if self.batch_first else input
            if lengths is not None:
                lengths = _check_lengths(lengths, is_batched, max_batch_size, x.device)
            autocast = ops.autocast_dtype(x.device.type)
            onednn = autocast is not None and ops.torch_lstm_uses_onednn(x, self.proj_size > 0)
        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            hx = (
                torch.zeros(*shape, real_hidden_size, dtype=x.dtype, device=x.device),
                torch.zeros(*shape, self.hidden_size, dtype=x.dtype, device=x.device),
            )
        if batch_sizes is None:
            self.check_forward_args(input, hx, None)
        plan = None
        if autocast is not None:
            plan = ops.lstm_autocast_dtypes(x, hx, weights, autocast, self.proj_size > 0,
                                            self.num_layers, self.bidirectional, onednn,
                                            batch_sizes)
        variant = self._variant_options()
        norms = variant.layer_norm if variant is not None else None
        if plan is not None:
            x = ops.autocast_cast(x, plan[0])
            reverse_input = ops.autocast_cast(reverse_input, plan[0])
            hx = tuple(ops.autocast_cast(t, plan[0]) for t in hx)
            weights = [ops.autocast_cast(w, plan[0]) for w in weights]
            if norms is not None:
                norms = [tuple(ops.autocast_cast(t, plan[0]) for t in n) for n in norms]
                variant = variant._replace(layer_norm=norms)
        _check_dtypes(x, hx, weights if norms is None else
                      [*weights, *(t for n in norms for t in n)])
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        with _autocast_off(x.device.type, autocast):
            output, h_n, c_n = _lstm(
                x, hx, weights, self.num_layers, num_directions, self.bias,
                self.proj_size > 0, self.dropout, self.training, lengths, reverse_input, variant,
            )
            if plan is not None and plan[1] is not None:
                c_n = c_n.to(plan[1])
            if batch_sizes is not None:
                output = PackedSequence(_pack_padded(output, packed_index), batch_sizes,
                                        sorted_indices, unsorted_indices)
                return output, self.permute_hidden((h_n, c_n), unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _check_packed_forward_args(self, data: Tensor, batch_sizes: Tensor,
                                   hx: tuple[Tensor, Tensor], batch_size) -> None:
        """check_forward_args for a PackedSequence, with torch's messages. Its batch size
        (batch_sizes[0]) is data to torch.compile, which checks the state's against it at run
        time instead (torch._check)."""
        self.check_input(data, batch_sizes)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        for i, (t, size) in enumerate(((hx[0], self.proj_size or self.hidden_size),
                                       (hx[1], self.hidden_size))):
            def message(t=t, size=size, i=i):
                expected = (layers, batch_size, size)
                return f"Expected hidden[{i}] size {expected}, got {list(t.size())}"

            if t.dim() != 3 or t.shape[0] != layers or t.shape[2] != size:
                raise RuntimeError(message())
            if torch.compiler.is_compiling():
                torch._check(t.shape[1] == batch_size, lambda: _STATE_BATCH_SIZE)
            elif t.shape[1] != batch_size:
                raise RuntimeError(message())


_STATE_BATCH_SIZE = "the batch size of hx (its size(1)) must be the PackedSequence's batch_sizes[0]"


def _check_hx_pair(hx) -> None:
    # torch.nn.LSTM takes (h_0, c_0) as a tuple or list of two tensors; anything else fails in its
    # kernel with these exception types.
    if not isinstance(hx, (tuple, list)):
        raise TypeError(
            f"lstm(): hx must be a tuple of two tensors (h_0, c_0), got {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError(f"lstm expects two hidden states, got {len(hx)}")
    for i, t in enumerate(hx):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"lstm(): expected Tensor as element {i} of hx (h_0, c_0), got {type(t).__name__}")


def _check_batch_sizes(batch_sizes: Tensor) -> None:
    if batch_sizes.dtype != torch.int64:
        kind = TypeError if batch_sizes.is_floating_point() else RuntimeError
        raise kind(f"PackedSequence batch_sizes must be an int64 tensor (expected scalar type Long), "
                   f"got {batch_sizes.dtype}")


def _check_weights(weights: list, names: list[str]) -> list[Tensor]:
    for i, (w, name) in enumerate(zip(weights, names)):
        if not isinstance(w, Tensor):
            raise TypeError(f"expected Tensor as element {i} in argument 2 (the LSTM weights: "
                            f"{name}), but got {type(w).__name__}")
    return weights


def _autocast_off(device_type: str, autocast: torch.dtype | None):
    # The module casts by torch.nn.LSTM's rule (ops.lstm_autocast_dtypes) itself: the ops inside it
    # (the layer op, index_copy, cat, stack) must not be cast again.
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _check_lengths(lengths, is_batched: bool, batch_size, device: torch.device) -> Tensor:
    if not is_batched:
        raise ValueError("LSTM: lengths needs a batched (3-D) input, got an unbatched (2-D) one")
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"LSTM: lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"LSTM: lengths must have shape ({batch_size},) = (batch size,), got "
                         f"{tuple(lengths.shape)}")
    # Values are checked against [0, T] by the op, where the data is (checking here would read it
    # back from the device and cannot be traced).
    return lengths.to(device=device, dtype=torch.int64)


def _check_dtypes(x: Tensor, hx: tuple[Tensor, Tensor], weights: list[Tensor]) -> None:
    # The checks torch.nn.LSTM's kernel makes, with its messages. (A non-float input never gets here:
    # check_input has already raised torch's ValueError for it.)
    for kind, tensors in (("hidden", hx), ("parameter", weights)):
        for t in tensors:
            if t.dtype != x.dtype:
                raise RuntimeError(
                    f"Input and {kind} tensors are not the same dtype, found input tensor with "
                    f"{_tname(x)} and {kind} tensor with {_tname(t)}"
                )
            if t.device != x.device:
                raise RuntimeError(
                    f"Input and {kind} tensors are not at the same device, found input tensor at "
                    f"{x.device} and {kind} tensor at {t.device}"
                )


def _tname(t: Tensor) -> str:
    names = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
             torch.bfloat16: "BFloat16"}
    return names.get(t.dtype, str(t.dtype).replace("torch.", "").capitalize())


def _lstm(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: list[Tensor],
    num_layers: int,
    num_directions: int,
    has_bias: bool,
    has_proj: bool,
    dropout: float,
    training: bool,
    lengths: Tensor | None,
    reverse_input: Tensor | None = None,
    variant: variants.Options | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, B, I] time-major; hx ([L*D, B, P], [L*D, B, H]); weights in torch's _flat_weights order;
    reverse_input [T, B, I]: the first layer's reverse direction's input where it is not x;
    variant: the call's variant options, None for the plain LSTM."""
    run_layer = _layer_runner(x.device) if variant is None else _variant_runner(x.device, variant)
    per_direction = 2 + 2 * int(has_bias) + int(has_proj)
    h0, c0 = hx
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        k = layer * num_directions
        w = [_direction_weights(weights[j * per_direction:(j + 1) * per_direction], has_bias)
             for j in range(k, k + num_directions)]
        if layer == 0 and reverse_input is not None:
            layer_input = (x, reverse_input)
        extra = {} if variant is None else {"first": k}
        layer_input, h, c = run_layer(layer_input, h0[k:k + num_directions],
                                      c0[k:k + num_directions], w, has_bias, has_proj, lengths,
                                      **extra)
        h_n.append(h)
        c_n.append(c)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    if (num_directions == 1 and layer_input.dtype == torch.float64
            and (layer_input.requires_grad or torch.jit.is_tracing())):
        # The op saves its output for backward. torch.nn.LSTM's float64 path lets the caller edit
        # its output in place before backward (its float32/16-bit oneDNN path does not): in float64
        # the caller gets a copy, at the cost of one copy of the output. (A trace records it whatever
        # the grad mode, so that the graph does not depend on it.)
        layer_input = layer_input.clone()
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def _layer_runner(device: torch.device):
    """How each layer runs, chosen once per forward: while torch.onnx.export traces, as ONNX
    operators (fastlstm/onnx.py); otherwise each direction as fastlstm's op, or where it has no
    kernel for ``device``, as fastlstm.reference. Each runner takes one layer, all directions:
    (x [T, B, I], h0 [D, B, P], c0 [D, B, H], weights [D][...], has_bias, has_proj, lengths) and
    returns (output [T, B, D*P], h_n [D, B, P], c_n [D, B, H]); the op's runner also takes x as a
    pair, one input per direction."""
    if _onnx.is_exporting():
        return _onnx.lstm_layer
    layer = ops.layer_function(device)

    def run_directions(x, h0, c0, weights, has_bias, has_proj, lengths):
        def run(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
            return layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, d == 1)

        return _each_direction(run, x, h0, c0, weights, has_bias, has_proj)

    return run_directions


def _each_direction(run, x, h0, c0, weights, has_bias, has_proj):
    """A layer's directions, each ``run(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) -> (out, h, c)``;
    x one input for all directions or a pair. Returns (output [T, B, D*P], h_n [D, B, P],
    c_n [D, B, H])."""
    outputs, h_n, c_n = [], [], []
    inputs = x if isinstance(x, tuple) else (x,) * len(weights)
    for d, w in enumerate(weights):
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        out, h, c = run(d, inputs[d], h0[d], c0[d], w[0], w[1], b_ih, b_hh,
                        w[-1] if has_proj else None)
        outputs.append(out)
        h_n.append(h)
        c_n.append(c)
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)
    return output, torch.stack(h_n), torch.stack(c_n)


def _variant_runner(device: torch.device, variant: variants.Options):
    """_layer_runner for a call with variants: ``run(x, h0, c0, weights, has_bias, has_proj,
    lengths, first)``, ``first`` the index of the layer's first direction among all layers' (for its
    layer-norm parameters). Each direction draws its random masks in this order: its dropped w_hh
    (weight drop), then zoneout's c mask, then its h mask (docs/variants.md)."""
    if _onnx.is_exporting():
        return _onnx.variant_layer_runner(variant)
    _onnx.refuse_random_variants(variant)
    plain = None if variant.needs_variant_op() else ops.layer_function(device)

    def run_directions(x, h0, c0, weights, has_bias, has_proj, lengths, first):
        def run(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
            w_hh = variant.recurrent_weight(w_hh)
            if plain is not None:
                return plain(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, d == 1)
            T, B = x.shape[0], x.shape[1]
            z_c, z_h = variant.zoneout(T, B, w_ih.shape[0] // 4, w_hh.shape[1], x)
            norm = variant.layer_norm[first + d] if variant.layer_norm is not None else None
            out, h, c = ops.lstm_variant_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                               d == 1, z_c, z_h, variant.cell_clip, norm)
            return tuple(_as_dtype(t, x.dtype) for t in (out, h, c))

        return _each_direction(run, x, h0, c0, weights, has_bias, has_proj)

    return run_directions


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    # The layer's results in the input's dtype, as the plain op returns them: plain-PyTorch
    # arithmetic with 16-bit input and a float32 mask would promote them.
    return t if t.dtype == dtype else t.to(dtype)


def _direction_weights(w: list[Tensor], has_bias: bool) -> list[Tensor]:
    # w_ih, w_hh, then b_ih, b_hh with has_bias, then w_hr with has_proj.
    if not has_bias:
        return list(w)
    return [w[0], w[1], _as_bias(w[2]), _as_bias(w[3]), *w[4:]]


def _as_bias(b: Tensor) -> Tensor:
    # torch.nn.LSTM broadcasts a bias of shape [1, 4H] (or [1, ..., 1, 4H]) against its gates.
    if b.dim() > 1 and b.numel() == b.shape[-1]:
        return b.reshape(b.shape[-1])
    return b


def _packed_batch_size(batch_sizes: Tensor):
    """batch_sizes[0], the batch size (an unbacked SymInt under torch.compile)."""
    if batch_sizes.dim() > 1:  # torch.nn.LSTM fails on it with a TypeError too
        raise TypeError(f"PackedSequence batch_sizes must be 1-D, got a {batch_sizes.dim()}-D "
                        "tensor")
    batch_size = int(batch_sizes[0])  # an IndexError for 0-D or empty ones, as in torch.nn.LSTM
    torch._check(batch_size >= 0, lambda: "PackedSequence batch_sizes must not be negative")
    return batch_size


def _packed_layout(batch_sizes: Tensor, batch_size, data: Tensor, onednn: bool):
    """Where the packed rows go in a padded [T, B] batch: ``(index, lengths, rows)``, index [rows]
    the positions t * B + b of the first ``rows`` packed rows in packed (time-major) order, lengths
    [B]; both on the data's device.

    batch_sizes must be non-increasing and not negative and sum to at most the data's rows (what
    torch.nn.LSTM fails on with a RuntimeError from inside its kernel). Where they sum to fewer,
    the rows after them are left out, as torch's step-by-step implementation does; its oneDNN one
    (``onednn``: the input would run on it) fails when the batch sizes are also all equal, and so
    does this. The checks are tensor asserts and the index is built from the batch sizes with
    tensor ops, so that torch.compile keeps all of it in one graph; there, the batch sizes must
    sum to exactly the data's rows (a runtime check), so that the output keeps the data's size."""
    steps = batch_sizes.shape[0]
    ends = batch_sizes.cumsum(0)
    total = ends[steps - 1]
    ordered = (batch_sizes[1:] <= batch_sizes[:-1]).all() & (batch_sizes[steps - 1] >= 0)
    torch._assert_async(ordered, "PackedSequence batch_sizes must be non-increasing and not "
                        "negative")
    rows = data.shape[0]
    torch._assert_async(total <= rows, "PackedSequence batch_sizes sum to more rows than its data "
                        "has")
    if onednn:
        torch._assert_async((total == rows) | (batch_sizes != batch_size).any(), (
            "PackedSequence batch_sizes are all equal but sum to fewer rows than its data has "
            "(torch.nn.LSTM's oneDNN path, which this input takes, raises on that too)"))
    if torch.compiler.is_compiling():
        torch._assert_async(total == rows, "fastlstm.LSTM under torch.compile needs PackedSequence "
                            "batch_sizes that sum to the number of rows of its data")
    else:
        rows = int(total)
    row = torch.arange(rows)
    step = torch.searchsorted(ends, row, right=True)
    index = step * batch_size + row - (ends - batch_sizes)[step]
    lengths = (batch_sizes.unsqueeze(0) > torch.arange(batch_size).unsqueeze(1)).sum(1)
    return index.to(data.device), lengths.to(data.device), rows


def _pad_packed(data: Tensor, index: Tensor, steps, batch_size) -> Tensor:
    """Packed [N, I] -> padded [T, B, I] (sorted batch order)."""
    padded = data.new_zeros(steps * batch_size, *data.shape[1:]).index_copy(0, index, data)
    return padded.view(steps, batch_size, *data.shape[1:])


def _pack_padded(x: Tensor, index: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, index)


def replace_lstm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` inside ``module`` (recursively) by a ``fastlstm.LSTM``, and
    every ``torch.nn.LSTMCell`` by a ``fastlstm.LSTMCell``, with the same configuration, the very same Parameter objects (so an optimizer that holds them still
    works), device, dtype, train/eval mode, hooks and parametrizations (``weight_norm``,
    ``spectral_norm``, ``torch.nn.utils.parametrize``, pruning). Modifies ``module`` in place and
    returns it; a bare ``torch.nn.LSTM`` (or cell) passed in is returned converted (the original is left as it
    was, sharing its parameters with the copy).

    A subclass of ``torch.nn.LSTM`` (or cell) is left unchanged, with a warning: its own code (a ``forward``
    of its own, say) would be lost in the conversion."""
    converted = _convert(module)
    if converted is not None:
        return converted
    for name, child in module.named_children():
        new = _convert(child)
        if new is not None:
            setattr(module, name, new)
        elif not isinstance(child, (nn.LSTM, nn.LSTMCell)):
            replace_lstm(child)
    return module


def _convert(module: nn.Module) -> nn.Module | None:
    """A fastlstm.LSTM (LSTMCell) that shares everything of a torch.nn.LSTM (LSTMCell) but its class,
    or None if ``module`` is not one that can be converted."""
    for torch_cls, fast_cls in ((nn.LSTM, LSTM), (nn.LSTMCell, LSTMCell)):
        if isinstance(module, torch_cls):
            break
    else:
        return None
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__bases__ == (torch_cls,):
        # torch.nn.utils.parametrize swapped the class for a generated subclass holding one property
        # per parametrized tensor: generate the same on top of the fastlstm class.
        new_cls = type(cls.__name__.replace(torch_cls.__name__, "Fast" + torch_cls.__name__),
                       (fast_cls,), dict(vars(cls)))
    elif cls is torch_cls:
        new_cls = fast_cls
    else:
        warnings.warn(
            f"fastlstm.replace_lstm: left {cls.__qualname__} (a subclass of "
            f"torch.nn.{torch_cls.__name__}) unchanged; converting it would drop its own code",
            UserWarning,
            stacklevel=3,
        )
        return None
    new = new_cls.__new__(new_cls)
    # The module's state is its __dict__: parameters, buffers, submodules (parametrizations), hooks
    # (weight_norm, spectral_norm and pruning are forward pre-hooks), flags. Each dict is copied, so
    # the two modules share tensors and hook functions but can be changed apart.
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in vars(module).items()})
    if isinstance(new, LSTM):
        new._flat_weights_names = list(module._flat_weights_names)
        new._all_weights = [list(w) for w in module._all_weights]
        new._update_flat_weights()
    return new

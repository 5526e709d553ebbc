"""``fastlstm.LSTM``: ``torch.nn.LSTM`` for its users, on fastlstm's fused ops.

It subclasses ``torch.nn.RNNBase`` (as ``torch.nn.LSTM`` does), so construction, argument checks,
parameters, initialisation, ``state_dict``, ``all_weights``, ``flatten_parameters`` and ``repr`` are
torch's own; it is deliberately *not* a ``torch.nn.LSTM`` (Dynamo refuses to compile any instance of
that class). Only ``forward`` differs: layers and directions are composed from the one-layer op
(fastlstm.ops.lstm_layer), and a PackedSequence is run through the op's per-sequence lengths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import onnx as _onnx
from . import ops
from .cell import _convert_cell

__all__ = ["LSTM", "replace_lstm"]


class LSTM(nn.RNNBase):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.LSTM` running on fastlstm's fused kernels.\n\n"
        "Same arguments, parameters, state_dict, forward signature and outputs; see torch's "
        "documentation below.\n\n" + (nn.LSTM.__doc__ or "")
    )

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own shape checks and hidden-state permutation, so errors read the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None, lengths=None):  # noqa: C901 (mirrors torch.nn.LSTM.forward)
        """torch.nn.LSTM's forward, plus ``lengths``: for a padded batch (3-D ``input``), a
        tensor [B] of each sequence's length (integers in [0, T], any order, on any device). It
        gives what pack_padded_sequence -> LSTM -> pad_packed_sequence gives, without packing:
        ``output`` is zero past each length and ``h_n``/``c_n`` are each sequence's state at its
        last step (a length of 0 leaves the initial state). Unlike a PackedSequence it exports
        (torch.export, ONNX ``sequence_lens``) with dynamic batch and sequence length."""
        self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = None
        sorted_indices = unsorted_indices = None
        is_batched = True
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("LSTM: lengths cannot be given with a PackedSequence input, "
                                 "which carries its own lengths")
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
                self.check_forward_args(data, hx, batch_sizes)
            else:
                self.check_input(data, batch_sizes)
            packed_index, lengths = _packed_index(batch_sizes, data.device)
            x = _pad_packed(data, batch_sizes, packed_index)
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
        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            hx = (
                torch.zeros(*shape, real_hidden_size, dtype=x.dtype, device=x.device),
                torch.zeros(*shape, self.hidden_size, dtype=x.dtype, device=x.device),
            )
        if batch_sizes is None:
            self.check_forward_args(input, hx, None)
        _check_dtypes(x, hx, self._flat_weights)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        output, h_n, c_n = _lstm(
            x, hx, self._flat_weights, self.num_layers, num_directions, self.bias,
            self.proj_size > 0, self.dropout, self.training, lengths,
        )

        if batch_sizes is not None:
            output = PackedSequence(
                _pack_padded(output, packed_index), batch_sizes, sorted_indices, unsorted_indices
            )
            return output, self.permute_hidden((h_n, c_n), unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, B, I] time-major; hx ([L*D, B, P], [L*D, B, H]); weights in torch's _flat_weights order."""
    per_direction = 2 + 2 * int(has_bias) + int(has_proj)
    h0, c0 = hx
    h_n, c_n = [], []
    layer_input = x
    exporting = _onnx.is_exporting()
    for layer in range(num_layers):
        if exporting:  # one ONNX LSTM node per layer (fastlstm/onnx.py)
            k = layer * num_directions
            w = [weights[j * per_direction:(j + 1) * per_direction]
                 for j in range(k, k + num_directions)]
            layer_input, h, c = _onnx.lstm_layer(
                layer_input, h0[k:k + num_directions], c0[k:k + num_directions], w, has_bias,
                has_proj, lengths)
            h_n.extend(h.unbind(0))
            c_n.extend(c.unbind(0))
        else:
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                w = weights[k * per_direction:(k + 1) * per_direction]
                b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
                w_hr = w[-1] if has_proj else None
                out, h, c = ops.lstm_layer(
                    layer_input, h0[k], c0[k], w[0], w[1], b_ih, b_hh, w_hr, lengths,
                    reverse=direction == 1,
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, 2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def _packed_index(batch_sizes: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions t * B + b of the packed rows in a padded [T, B] batch, in packed (time-major)
    order, and the lengths [B]; both built on the CPU from batch_sizes (which lives there), so no
    data-dependent op runs on the device (none can on meta; on CUDA it would synchronise)."""
    B = int(batch_sizes[0])
    present = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
    index = present.view(-1).nonzero().squeeze(1)
    return index.to(device), present.sum(0).to(device)


def _pad_packed(data: Tensor, batch_sizes: Tensor, index: Tensor) -> Tensor:
    """Packed [N, I] -> padded [T, B, I] (sorted batch order)."""
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    padded = data.new_zeros(T * B, *data.shape[1:]).index_copy(0, index, data)
    return padded.view(T, B, *data.shape[1:])


def _pack_padded(x: Tensor, index: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, index)


def replace_lstm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` inside ``module`` (and ``module`` itself's children,
    recursively) by a ``fastlstm.LSTM``, and every ``torch.nn.LSTMCell`` by a
    ``fastlstm.LSTMCell``, with the same configuration, weights, device, dtype and
    train/eval mode. Modifies ``module`` in place and returns it; a bare ``torch.nn.LSTM`` passed in
    is returned converted."""
    if isinstance(module, nn.LSTM):
        return _convert(module)
    if isinstance(module, nn.LSTMCell):
        return _convert_cell(module)
    for name, child in module.named_children():
        if isinstance(child, nn.LSTM):
            setattr(module, name, _convert(child))
        elif isinstance(child, nn.LSTMCell):
            setattr(module, name, _convert_cell(child))
        else:
            replace_lstm(child)
    return module


def _convert(lstm: nn.LSTM) -> LSTM:
    new = LSTM(
        lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias,
        batch_first=lstm.batch_first, dropout=lstm.dropout, bidirectional=lstm.bidirectional,
        proj_size=lstm.proj_size, device="meta",
    )
    # The very same Parameter objects: device, dtype, requires_grad and any optimizer that already
    # holds them carry over.
    for name in lstm._flat_weights_names:
        setattr(new, name, getattr(lstm, name))
    new.train(lstm.training)
    return new

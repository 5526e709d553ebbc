"""ONNX export: while ``torch.onnx.export(..., dynamo=True)`` traces a model, each fastlstm layer
(both directions at once) becomes one ONNX ``LSTM`` node instead of fastlstm's custom op, which no
ONNX runtime knows.

ONNX's LSTM computes what torch.nn.LSTM does, with its parameters laid out differently: gates in the
order i, o, f, c (torch: i, f, g, o), the directions stacked (W [D, 4H, I], R [D, 4H, H],
B [D, 8H] = the input and recurrent biases concatenated), and per-sequence lengths as the int32
``sequence_lens`` input (outputs past a length are zero, the final state is each sequence's last
step, the reverse direction starts at each sequence's own end: the contract of fastlstm's op). The
rearrangement is written in torch ops on the parameters, which the exporter folds into constants.

proj_size has no counterpart in ONNX's LSTM: exporting a model that uses it raises an error that
says so.

A program captured beforehand with torch.export holds fastlstm's op itself; translation_table()
gives torch.onnx.export the translation of that op (one direction of one layer) to ONNX's LSTM.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["is_exporting", "lstm_layer", "translation_table"]


def is_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing the caller (with ``dynamo=False`` too, which cannot
    export fastlstm: see :func:`lstm_layer`)."""
    # torch.onnx.export first captures the model with torch.export(strict=False), then, if that
    # fails, with strict=True, under Dynamo, which treats torch.onnx.is_in_onnx_export() as the
    # constant False. The exporter's own flag, read directly, is what that function returns and is
    # seen by Dynamo as it is, so every capture takes the same path (and an unsupported
    # configuration fails each with the same message, rather than a later, vaguer one).
    if "torch.onnx" not in sys.modules:  # no export can be running (and importing it costs 0.1 s)
        return False
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return True
    return torch.onnx.is_in_onnx_export()


def _onnx_gate_order(t: Tensor) -> Tensor:
    # Slices rather than chunk(): the exporter folds Slice on constants, not a multi-output Split.
    H = t.shape[0] // 4
    return torch.cat([t[:H], t[3 * H:], t[H:2 * H], t[2 * H:3 * H]], 0)


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[list[Tensor]],
    has_bias: bool,
    has_proj: bool,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, all its directions, as an ONNX LSTM node.

    x [T, B, I]; h0 [D, B, H]; c0 [D, B, H]; weights[d] = [w_ih [4H, I], w_hh [4H, H], then
    b_ih [4H], b_hh [4H] when has_bias] for direction d (D = 1 or 2, the second one reversed);
    lengths [B] integer or None. Returns output [T, B, D*H], h_n [D, B, H], c_n [D, B, H]."""
    if has_proj:
        raise RuntimeError(
            "fastlstm: ONNX export of an LSTM with proj_size > 0 is not supported: ONNX's LSTM "
            "operator has no projection (proj_size). Export the model without proj_size, or "
            "export it with torch.export instead of ONNX.")
    if torch.jit.is_tracing():
        raise RuntimeError(
            "fastlstm: the legacy TorchScript ONNX exporter cannot export fastlstm.LSTM; use "
            "torch.onnx.export(..., dynamo=True)")
    T, B, _ = x.shape
    D = len(weights)
    H = weights[0][0].shape[0] // 4
    W = torch.stack([_onnx_gate_order(w[0]) for w in weights])
    R = torch.stack([_onnx_gate_order(w[1]) for w in weights])
    bias = (torch.stack([torch.cat([_onnx_gate_order(w[2]), _onnx_gate_order(w[3])])
                         for w in weights]) if has_bias else None)
    seq_lens = lengths.to(torch.int32) if lengths is not None else None
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [x, W, R, bias, seq_lens, h0, c0],
        {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"},
        dtypes=[x.dtype] * 3,
        shapes=[[T, D, B, H], [D, B, H], [D, B, H]],
    )
    # Y [T, D, B, H] -> [T, B, D*H]: directions side by side, as torch.nn.LSTM concatenates them.
    return y.permute(0, 2, 1, 3).reshape(T, B, D * H), h_n, c_n


def translation_table() -> dict:
    """``{torch.ops.fastlstm.lstm_layer_forward.default: translation}`` for
    ``torch.onnx.export(exported_program, dynamo=True, custom_translation_table=...)``, where
    ``exported_program`` came from ``torch.export`` (exporting the module itself needs nothing).
    Needs onnxscript."""
    from onnxscript import opset18 as op

    def lstm_layer_forward(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
                           lengths=None, reverse: bool = False, training: bool = True):
        if w_hr is not None:
            raise RuntimeError(
                "fastlstm: ONNX export of an LSTM with proj_size > 0 is not supported: ONNX's "
                "LSTM operator has no projection (proj_size).")
        H = w_ih.shape[0] // 4

        def gate_order(t):  # i, f, g, o -> ONNX's i, o, f, c
            def rows(a, b):
                return op.Slice(t, op.Constant(value_ints=[a]), op.Constant(value_ints=[b]))
            return op.Concat(rows(0, H), rows(3 * H, 4 * H), rows(H, 2 * H), rows(2 * H, 3 * H),
                             axis=0)

        axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        W = op.Unsqueeze(gate_order(w_ih), axis0)
        R = op.Unsqueeze(gate_order(w_hh), axis0)
        B = None
        if b_ih is not None or b_hh is not None:
            zeros = op.ConstantOfShape(op.Constant(value_ints=[4 * H]))
            bi = gate_order(b_ih) if b_ih is not None else op.CastLike(zeros, w_ih)
            bh = gate_order(b_hh) if b_hh is not None else op.CastLike(zeros, w_ih)
            B = op.Unsqueeze(op.Concat(bi, bh, axis=0), axis0)
        seq_lens = op.Cast(lengths, to=6) if lengths is not None else None  # 6: int32
        y, h_n, c_n = op.LSTM(input, W, R, B, seq_lens, op.Unsqueeze(h0, axis0),
                              op.Unsqueeze(c0, axis0), hidden_size=H,
                              direction="reverse" if reverse else "forward")
        # gates, cells, hidden: what a backward would use; an exported program never reads them.
        empty = op.CastLike(op.ConstantOfShape(axis0), input)
        return (op.Squeeze(y, axis1), op.Squeeze(h_n, axis0), op.Squeeze(c_n, axis0), empty,
                empty, empty)

    return {torch.ops.fastlstm.lstm_layer_forward.default: lstm_layer_forward}

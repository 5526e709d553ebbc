"""ONNX export: while ``torch.onnx.export(..., dynamo=True)`` traces a model, each fastlstm layer
(both directions at once) becomes one ONNX ``LSTM`` node instead of fastlstm's custom op, which no
ONNX runtime knows.

ONNX's LSTM computes what torch.nn.LSTM does, with its parameters laid out differently: gates in the
order i, o, f, c (torch: i, f, g, o), the directions stacked (W [D, 4H, I], R [D, 4H, H],
B [D, 8H] = the input and recurrent biases concatenated), and per-sequence lengths as the int32
``sequence_lens`` input (outputs past a length are zero, the final state is each sequence's last
step, the reverse direction starts at each sequence's own end: the contract of fastlstm's op). The
rearrangement is written in torch ops on the parameters, which the exporter folds into constants.

ONNX's LSTM has no projection (proj_size). A layer with one is written as torch's ``scan`` over
time instead, which the exporter turns into an ONNX ``Scan`` per direction: the input's share of
the gates for all steps is one MatMul before the loop, and the loop body does the recurrent
MatMul, the gates and the projection. Per-sequence lengths become a mask: a step past a sequence's
length keeps its state and outputs zeros, which gives the same contract in both directions.

A program captured beforehand with torch.export holds fastlstm's op itself; translation_table()
gives torch.onnx.export the translation of that op (one direction of one layer) to ONNX's LSTM, or
with proj_size to a Scan (fastlstm/_onnx_scan.py).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import reference

__all__ = ["is_exporting", "lstm_layer", "refuse_random_variants", "translation_table",
           "variant_layer_runner"]


def is_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing the caller (with ``dynamo=False`` too, which cannot
    export fastlstm: see :func:`lstm_layer`): ``torch.onnx.is_in_onnx_export()``, which both
    exporters set."""
    if "torch.onnx" not in sys.modules:  # no export can be running (and importing it costs 0.1 s)
        return False
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
    """One layer, all its directions, as an ONNX LSTM node (with has_proj: as Scan loops).

    x [T, B, I]; h0 [D, B, P]; c0 [D, B, H]; weights[d] = [w_ih [4H, I], w_hh [4H, P], then
    b_ih [4H], b_hh [4H] when has_bias, then w_hr [P, H] when has_proj] for direction d (D = 1 or
    2, the second one reversed); P = H without has_proj; lengths [B] integer or None. Returns
    output [T, B, D*P], h_n [D, B, P], c_n [D, B, H]."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "fastlstm: the legacy TorchScript ONNX exporter cannot export fastlstm.LSTM; use "
            "torch.onnx.export(..., dynamo=True)")
    if has_proj:
        return _scan_layer(x, h0, c0, weights, has_bias, has_proj, lengths)
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


def refuse_random_variants(variant) -> None:
    """Raises while torch.onnx.export traces a module whose variants draw random masks (zoneout,
    weight drop in training mode), which an exported graph would not redraw. Also under the
    exporter's fallback to torch.export(strict=True), where Dynamo reads is_exporting() as False:
    there the exporter's own flag (private, hence read defensively) says it is running."""
    random = [name for name, on in (("zoneout", variant.zoneout_c or variant.zoneout_h),
                                    ("weight_drop", variant.weight_drop)) if on]
    if not (variant.training and random):
        return
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if is_exporting() or (flags is not None and getattr(flags, "_is_onnx_exporting", False)):
        raise RuntimeError(
            f"fastlstm: ONNX export of an LSTM with {' and '.join(random)} in training mode is not "
            "supported (an exported graph is for inference); export the model in "
            "evaluation mode (model.eval()), where zoneout is its expectation and weight_drop off")


def variant_layer_runner(variant):
    """lstm_layer for a module with variants (fastlstm.variants.Options ``variant``), taking also
    ``first``, the index of the layer's first direction among all layers' (for its layer-norm
    parameters). In evaluation, zoneout (its expectation), layer normalisation and cell clipping
    are plain arithmetic in the loop body: each direction is a Scan (_scan_layer). In training,
    zoneout and weight drop draw random masks: refused (refuse_random_variants)."""
    refuse_random_variants(variant)

    def run(x, h0, c0, weights, has_bias, has_proj, lengths, first):
        if torch.jit.is_tracing():
            raise RuntimeError(
                "fastlstm: the legacy TorchScript ONNX exporter cannot export fastlstm.LSTM; use "
                "torch.onnx.export(..., dynamo=True)")
        norms = variant.layer_norm
        return _scan_layer(x, h0, c0, weights, has_bias, has_proj, lengths, variant,
                           norms[first:first + len(weights)] if norms is not None else None)

    return run


def _scan_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[list[Tensor]],
    has_bias: bool,
    has_proj: bool,
    lengths: Tensor | None,
    variant=None,
    norms: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """lstm_layer with proj_size, which ONNX's LSTM lacks, or with the variants of ``variant``
    (evaluation; ``norms`` each direction's layer-norm parameters): torch's scan over time per
    direction, which the exporter translates to an ONNX Scan (the reverse one as a Scan over
    flipped steps). The input's share of the gates is one MatMul over all steps, outside the loop;
    a step at t >= lengths[b] keeps sequence b's state and outputs zeros
    (fastlstm.reference.lstm_layer's rule), which also starts the reverse direction at each
    sequence's own end."""
    try:
        from torch._higher_order_ops.scan import scan
    except ImportError as e:  # a private module: say what is missing if a torch moves it
        raise RuntimeError(
            "fastlstm: ONNX export of an LSTM with proj_size > 0 needs torch's scan "
            "(torch._higher_order_ops.scan), which this torch does not have") from e
    # Without lengths every step is active: one masked recurrence serves both cases.
    steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    active = (steps < (lengths.unsqueeze(0) if lengths is not None else x.shape[0])).unsqueeze(2)
    active = active.expand(x.shape[0], x.shape[1], 1)  # [T, B, 1]
    outputs, h_n, c_n = [], [], []
    for d, w in enumerate(weights):
        gates_x = x @ w[0].t()  # [T, B, 4H]
        bias = w[2].reshape(-1) + w[3].reshape(-1) if has_bias else None
        if bias is not None and variant is None:
            gates_x = gates_x + bias

        def step(state, xs, w_hh=w[1], w_hr=w[-1] if has_proj else None, bias=bias,
                 norm=norms[d] if norms is not None else None):
            h, c = state
            g_x, a = xs
            if variant is None:
                h_new, c_new = reference.lstm_step(g_x, h, c, w_hh, w_hr)
            else:  # layer norm normalises x_t W_ih^T before the bias is added
                h_new, c_new = reference.lstm_variant_step(
                    g_x, h, c, w_hh, bias, w_hr, variant.zoneout_c or None,
                    variant.zoneout_h or None, variant.cell_clip, norm)
            return ((torch.where(a, h_new, h), torch.where(a, c_new, c)),
                    torch.where(a, h_new, 0.0))

        (h, c), out = scan(step, (h0[d], c0[d]), (gates_x, active), reverse=d == 1)
        outputs.append(out)
        h_n.append(h)
        c_n.append(c)
    return torch.cat(outputs, 2), torch.stack(h_n), torch.stack(c_n)


def translation_table() -> dict:
    """``{torch.ops.fastlstm.lstm_layer_forward.default: translation}`` for
    ``torch.onnx.export(exported_program, dynamo=True, custom_translation_table=...)``, where
    ``exported_program`` came from ``torch.export`` (exporting the module itself needs nothing).
    One direction of one layer becomes one ONNX LSTM node, or with proj_size (w_hr) a call of a
    function holding a Scan. Needs onnxscript."""
    from onnxscript import opset18 as op

    from ._onnx_scan import lstm_projected_scan as scan

    def lstm_layer_forward(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
                           lengths=None, reverse: bool = False, training: bool = True):
        axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        # gates, cells, hidden: what a backward would use; an exported program never reads them.
        empty = op.CastLike(op.ConstantOfShape(axis0), input)
        if w_hr is not None:
            y, h_n, c_n = projected(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
            return y, h_n, c_n, empty, empty, empty
        H = w_ih.shape[0] // 4

        def gate_order(t):  # i, f, g, o -> ONNX's i, o, f, c
            def rows(a, b):
                return op.Slice(t, op.Constant(value_ints=[a]), op.Constant(value_ints=[b]))
            return op.Concat(rows(0, H), rows(3 * H, 4 * H), rows(H, 2 * H), rows(2 * H, 3 * H),
                             axis=0)

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
        return (op.Squeeze(y, axis1), op.Squeeze(h_n, axis0), op.Squeeze(c_n, axis0), empty,
                empty, empty)

    def projected(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
        # As _scan_layer: the input's share of the gates for all steps, then a Scan.
        axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])

        def flip(t):  # along time: the reverse direction runs a forward Scan on reversed steps
            return op.Slice(t, op.Constant(value_ints=[-1]),
                            op.Constant(value_ints=[-(2 ** 63)]), axis0,
                            op.Constant(value_ints=[-1]))

        gates_x = op.MatMul(input, op.Transpose(w_ih, perm=[1, 0]))  # [T, B, 4H]
        for b in (b_ih, b_hh):
            if b is not None:
                gates_x = op.Add(gates_x, b)
        weights = (op.Transpose(w_hh, perm=[1, 0]), op.Transpose(w_hr, perm=[1, 0]))
        if reverse:
            gates_x = flip(gates_x)
        # Without lengths every step is active: one masked Scan serves both cases.
        steps = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(input, start=0, end=1)),
                         op.Constant(value_int=1))
        ends = (op.Cast(lengths, to=7) if lengths is not None  # 7: int64
                else op.Expand(op.Shape(input, start=0, end=1), op.Shape(input, start=1, end=2)))
        active = op.Unsqueeze(op.Less(op.Unsqueeze(steps, axis1), op.Unsqueeze(ends, axis0)),
                              op.Constant(value_ints=[2]))  # [T, B, 1]
        y, h_n, c_n = scan(h0, c0, gates_x, flip(active) if reverse else active, *weights)
        return (flip(y) if reverse else y), h_n, c_n

    return {torch.ops.fastlstm.lstm_layer_forward.default: lstm_layer_forward}


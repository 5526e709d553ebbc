"""ONNX export (torch.onnx.export(..., dynamo=True)) of models with fastlstm.LSTM, run in
onnxruntime with batch and sequence lengths other than the ones exported with, against eager.

The ONNX packages are the `test` extra (pip install -e ".[test]"); CI installs it."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm

onnx = pytest.importorskip("onnx", reason="needs the test extra: pip install onnx")
pytest.importorskip("onnxscript", reason="needs the test extra: pip install onnxscript")
ort = pytest.importorskip("onnxruntime", reason="needs the test extra: pip install onnxruntime")

# onnxruntime's CPU LSTM kernel is float32 only, and sums in another order than ours.
TOL = dict(rtol=1e-4, atol=1e-5)
SHAPES = [(4, 3), (9, 6), (1, 1), (2, 5)]  # (T, B): the first is the one exported with


def _export(model, args, dynamic_shapes, kwargs=None):
    prog = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                             verbose=False)
    proto = prog.model_proto
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, session


def _run(session, *inputs):
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs)
    feeds = {n: t.detach().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(a) for a in session.run(None, feeds)]


def _ops(proto):
    return [(n.domain, n.op_type) for n in proto.graph.node]


CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(bias=False, batch_first=True),
    dict(num_layers=3, bidirectional=True, batch_first=True, bias=False),
]
# proj_size has no counterpart in ONNX's LSTM: each direction of each layer becomes a Scan.
PROJ_CONFIGS = [
    dict(proj_size=3),
    dict(num_layers=2, bidirectional=True, proj_size=4),
    dict(bias=False, batch_first=True, proj_size=2),
    dict(num_layers=3, bidirectional=True, batch_first=True, bias=False, proj_size=3),
]


def _check_layer_ops(proto, model):
    """One ONNX LSTM per layer (both directions in it), or with proj_size one Scan per layer and
    direction; nothing of fastlstm's left in the graph."""
    ops = _ops(proto)
    if model.proj_size:
        D = 2 if model.bidirectional else 1
        assert ops.count(("", "Scan")) == model.num_layers * D
        assert ("", "LSTM") not in ops
    else:
        assert ops.count(("", "LSTM")) == model.num_layers
        assert ("", "Scan") not in ops
    assert not any("fastlstm" in domain or "fastlstm" in op for domain, op in ops)
    assert not proto.functions


@pytest.mark.parametrize("given_state", [False, True], ids=["default_state", "given_state"])
@pytest.mark.parametrize("config", CONFIGS + PROJ_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_export_matches_eager(config, given_state):
    model = fastlstm.LSTM(5, 7, **config).eval()
    bf = config.get("batch_first", False)
    L = model.num_layers * (2 if model.bidirectional else 1)
    P = model.proj_size or 7  # h's size; c's is 7
    T, B = torch.export.Dim("T"), torch.export.Dim("B")

    def inputs(t, b):
        x = torch.randn(b, t, 5) if bf else torch.randn(t, b, 5)
        return (x, (torch.randn(L, b, P), torch.randn(L, b, 7))) if given_state else (x,)

    x_dims = {0: B, 1: T} if bf else {0: T, 1: B}
    dynamic = (x_dims, ({1: B}, {1: B})) if given_state else (x_dims,)
    proto, session = _export(model, inputs(*SHAPES[0]), dynamic)
    _check_layer_ops(proto, model)
    for t, b in SHAPES:
        args = inputs(t, b)
        flat = (args[0], *args[1]) if given_state else args
        with torch.no_grad():
            out, (h, c) = model(*args)
        got = _run(session, *flat)
        for g, want in zip(got, (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)


@pytest.mark.parametrize("proj_size,given_state", [(0, False), (3, False), (3, True)],
                         ids=["plain", "proj_size", "proj_size,given_state"])
def test_export_lengths_matches_eager_and_packed_torch_lstm(proj_size, given_state):
    # Outputs past each length are zero, the final state is each sequence's last step, and the
    # reverse direction starts at each sequence's own end: what packing gives in torch.nn.LSTM.
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=proj_size)
    model = fastlstm.LSTM(5, 7, **kw).eval()
    ref = torch.nn.LSTM(5, 7, **kw).eval()
    ref.load_state_dict(model.state_dict())
    P = proj_size or 7
    T, B = torch.export.Dim("T"), torch.export.Dim("B")

    def state(b):
        return (torch.randn(4, b, P), torch.randn(4, b, 7)) if given_state else None

    x, lengths = torch.randn(3, 4, 5), torch.tensor([4, 2, 3])
    args, dynamic = (x,), {"input": {0: B, 1: T}}
    if given_state:
        args, dynamic["hx"] = (x, state(3)), ({1: B}, {1: B})
    dynamic["lengths"] = {0: B}  # last, as in forward's signature: the exporter zips them in order
    proto, session = _export(model, args, dynamic, kwargs={"lengths": lengths})
    _check_layer_ops(proto, model)
    assert any(i.name == "lengths" for i in proto.graph.input)
    for (t, b), lens in zip(SHAPES, ([4, 1, 3], [9, 1, 5, 9, 2, 3], [1], [2, 1, 2, 2, 1])):
        x, lengths, hx = torch.randn(b, t, 5), torch.tensor(lens), state(b)
        with torch.no_grad():
            out, (h, c) = model(x, hx, lengths=lengths)
            packed, (rh, rc) = ref(pack_padded_sequence(x, lengths, batch_first=True,
                                                        enforce_sorted=False), hx)
            rout, _ = pad_packed_sequence(packed, batch_first=True, total_length=t)
        got = _run(session, x, *(hx or ()), lengths)
        for g, want, torch_want in zip(got, (out, h, c), (rout, rh, rc)):
            torch.testing.assert_close(g, want, **TOL)
            torch.testing.assert_close(g, torch_want, **TOL)


@pytest.mark.parametrize("proj_size", [0, 3])
def test_export_unbatched_input(proj_size):
    model = fastlstm.LSTM(5, 7, bidirectional=True, proj_size=proj_size).eval()
    proto, session = _export(model, (torch.randn(4, 5),), ({0: torch.export.Dim("T")},))
    _check_layer_ops(proto, model)
    for t in (4, 11, 1):
        x = torch.randn(t, 5)
        with torch.no_grad():
            out, (h, c) = model(x)
        for g, want in zip(_run(session, x), (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)


class _Tagger(torch.nn.Module):
    """A small sequence tagger as a user would write it with torch.nn.LSTM."""

    def __init__(self, proj_size=0):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.lstm = torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True,
                                  proj_size=proj_size)
        self.head = torch.nn.Linear(2 * (proj_size or 8), 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out).log_softmax(-1)


@pytest.mark.parametrize("proj_size", [0, 5])
def test_export_model_converted_by_replace_lstm(proj_size):
    model = fastlstm.replace_lstm(_Tagger(proj_size)).eval()
    assert isinstance(model.lstm, fastlstm.LSTM)
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    proto, session = _export(model, (torch.randint(0, 20, (3, 6)),), ({0: B, 1: T},))
    _check_layer_ops(proto, model.lstm)
    tokens = torch.randint(0, 20, (5, 10))
    with torch.no_grad():
        want = model(tokens)
    (got,) = _run(session, tokens)
    torch.testing.assert_close(got, want, **TOL)


def test_export_proj_size_float64_runs_in_onnxruntime():
    # Without an ONNX LSTM node (onnxruntime's is float32 only), a float64 model runs too.
    model = fastlstm.LSTM(5, 7, bidirectional=True, proj_size=3).double().eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    _, session = _export(model, (torch.randn(4, 3, 5, dtype=torch.float64),), ({0: T, 1: B},))
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = model(x)
    for g, want in zip(_run(session, x), (out, h, c)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "no_lengths"])
@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_export_program_from_torch_export_with_translation_table(bias, proj_size, with_lengths):
    # A program captured with torch.export holds fastlstm's op; translation_table() translates it.
    model = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                          bias=bias, proj_size=proj_size).eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    kwargs, dynamic = {}, {"input": {0: B, 1: T}}
    if with_lengths:
        kwargs["lengths"], dynamic["lengths"] = torch.tensor([4, 2, 3]), {0: B}
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(3, 4, 5),), kwargs,
                                      dynamic_shapes=dynamic)
    assert any("fastlstm" in str(n.target) for n in program.graph.nodes)
    prog = torch.onnx.export(program, dynamo=True, verbose=False,
                             custom_translation_table=fastlstm.onnx.translation_table())
    onnx.checker.check_model(prog.model_proto)
    # One LSTM node, or with proj_size one Scan (in a function the exporter may inline), per layer
    # and direction.
    proto = prog.model_proto
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    assert [n.op_type for n in nodes].count("Scan" if proj_size else "LSTM") == 4
    session = ort.InferenceSession(prog.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for (t, b), lens in zip(SHAPES, ([4, 1, 3], [9, 1, 5, 9, 2, 3], [1], [2, 1, 2, 2, 1])):
        x, lengths = torch.randn(b, t, 5), torch.tensor(lens) if with_lengths else None
        with torch.no_grad():
            out, (h, c) = model(x, lengths=lengths)
        for g, want in zip(_run(session, x, *([lengths] if with_lengths else [])), (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)

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


@pytest.mark.parametrize("given_state", [False, True], ids=["default_state", "given_state"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
                         or "plain")
def test_export_matches_eager(config, given_state):
    model = fastlstm.LSTM(5, 7, **config).eval()
    bf = config.get("batch_first", False)
    L = model.num_layers * (2 if model.bidirectional else 1)
    T, B = torch.export.Dim("T"), torch.export.Dim("B")

    def inputs(t, b):
        x = torch.randn(b, t, 5) if bf else torch.randn(t, b, 5)
        return (x, (torch.randn(L, b, 7), torch.randn(L, b, 7))) if given_state else (x,)

    x_dims = {0: B, 1: T} if bf else {0: T, 1: B}
    dynamic = (x_dims, ({1: B}, {1: B})) if given_state else (x_dims,)
    proto, session = _export(model, inputs(*SHAPES[0]), dynamic)
    # One ONNX LSTM per layer (both directions in it) and nothing of fastlstm's left in the graph.
    assert _ops(proto).count(("", "LSTM")) == model.num_layers
    assert not any("fastlstm" in domain or "fastlstm" in op for domain, op in _ops(proto))
    for t, b in SHAPES:
        args = inputs(t, b)
        flat = (args[0], *args[1]) if given_state else args
        with torch.no_grad():
            out, (h, c) = model(*args)
        got = _run(session, *flat)
        for g, want in zip(got, (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)


def test_export_lengths_matches_eager_and_packed_torch_lstm():
    model = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    ref.load_state_dict(model.state_dict())
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    x, lengths = torch.randn(3, 4, 5), torch.tensor([4, 2, 3])
    proto, session = _export(model, (x,), ({0: B, 1: T}, {0: B}), kwargs={"lengths": lengths})
    assert ("", "LSTM") in _ops(proto)
    assert any(i.name == "lengths" for i in proto.graph.input)
    for (t, b), lens in zip(SHAPES, ([4, 1, 3], [9, 1, 5, 9, 2, 3], [1], [2, 1, 2, 2, 1])):
        x, lengths = torch.randn(b, t, 5), torch.tensor(lens)
        with torch.no_grad():
            out, (h, c) = model(x, lengths=lengths)
            packed, (rh, rc) = ref(pack_padded_sequence(x, lengths, batch_first=True,
                                                        enforce_sorted=False))
            rout, _ = pad_packed_sequence(packed, batch_first=True, total_length=t)
        got = _run(session, x, lengths)
        for g, want, torch_want in zip(got, (out, h, c), (rout, rh, rc)):
            torch.testing.assert_close(g, want, **TOL)
            torch.testing.assert_close(g, torch_want, **TOL)


def test_export_unbatched_input():
    model = fastlstm.LSTM(5, 7, bidirectional=True).eval()
    proto, session = _export(model, (torch.randn(4, 5),), ({0: torch.export.Dim("T")},))
    for t in (4, 11, 1):
        x = torch.randn(t, 5)
        with torch.no_grad():
            out, (h, c) = model(x)
        for g, want in zip(_run(session, x), (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)


class _Tagger(torch.nn.Module):
    """A small sequence tagger as a user would write it with torch.nn.LSTM."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.lstm = torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out).log_softmax(-1)


def test_export_model_converted_by_replace_lstm():
    model = fastlstm.replace_lstm(_Tagger()).eval()
    assert isinstance(model.lstm, fastlstm.LSTM)
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    _, session = _export(model, (torch.randint(0, 20, (3, 6)),), ({0: B, 1: T},))
    tokens = torch.randint(0, 20, (5, 10))
    with torch.no_grad():
        want = model(tokens)
    (got,) = _run(session, tokens)
    torch.testing.assert_close(got, want, **TOL)


def test_export_proj_size_fails_naming_proj_size():
    model = fastlstm.LSTM(5, 7, proj_size=3).eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="proj_size"):
        torch.onnx.export(model, (torch.randn(4, 3, 5),), dynamo=True, verbose=False)


@pytest.mark.parametrize("bias", [True, False])
def test_export_program_from_torch_export_with_translation_table(bias):
    # A program captured with torch.export holds fastlstm's op; translation_table() translates it.
    model = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                          bias=bias).eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(3, 4, 5),),
                                      {"lengths": torch.tensor([4, 2, 3])},
                                      dynamic_shapes={"input": {0: B, 1: T}, "lengths": {0: B}})
    assert any("fastlstm" in str(n.target) for n in program.graph.nodes)
    prog = torch.onnx.export(program, dynamo=True, verbose=False,
                             custom_translation_table=fastlstm.onnx.translation_table())
    onnx.checker.check_model(prog.model_proto)
    assert _ops(prog.model_proto).count(("", "LSTM")) == 4  # one per layer and direction
    session = ort.InferenceSession(prog.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for (t, b), lens in zip(SHAPES, ([4, 1, 3], [9, 1, 5, 9, 2, 3], [1], [2, 1, 2, 2, 1])):
        x, lengths = torch.randn(b, t, 5), torch.tensor(lens)
        with torch.no_grad():
            out, (h, c) = model(x, lengths=lengths)
        for g, want in zip(_run(session, x, lengths), (out, h, c)):
            torch.testing.assert_close(g, want, **TOL)


def test_translation_table_proj_size_fails_naming_proj_size():
    model = fastlstm.LSTM(5, 7, proj_size=3).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(4, 3, 5),))
    with pytest.raises(torch.onnx.OnnxExporterError, match="proj_size"):
        torch.onnx.export(program, dynamo=True, verbose=False,
                          custom_translation_table=fastlstm.onnx.translation_table())

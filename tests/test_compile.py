"""torch.compile(fullgraph=True) of models using fastlstm.LSTM: no graph break, eager results."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = fastlstm.LSTM(8, 12, num_layers=2, bidirectional=True, proj_size=5,
                                  batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def test_torch_nn_lstm_itself_is_refused():
    # Why fastlstm.LSTM is not a torch.nn.LSTM subclass: Dynamo refuses those in fullgraph mode.
    with pytest.raises(Exception, match="LSTM"):
        torch.compile(nn.LSTM(3, 4), fullgraph=True)(torch.randn(2, 1, 3))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    model = Tagger()
    tokens = torch.randint(0, 20, (4, 7))
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(tokens)
    out_e = model(tokens)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    grads_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_with_states_and_inference_mode():
    torch._dynamo.reset()
    m = fastlstm.LSTM(4, 6)
    h0, c0 = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    x = torch.randn(5, 3, 4)
    compiled = torch.compile(m, fullgraph=True)
    with torch.inference_mode():
        out_c, (h_c, c_c) = compiled(x, (h0, c0))
        out_e, (h_e, c_e) = m(x, (h0, c0))
    for a, b in ((out_c, out_e), (h_c, h_e), (c_c, c_e)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class PackedTagger(nn.Module):
    """A model fed a PackedSequence (packing itself, torch's pack_padded_sequence, is not
    traceable: it is done outside the compiled model)."""

    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(4, 6, bidirectional=True, proj_size=3)
        self.head = nn.Linear(6, 2)

    def forward(self, packed, hx=None):
        out, (h, c) = self.lstm(packed, hx)
        return self.head(out.data), h, c


@pytest.mark.parametrize("enforce_sorted,given_state", [(True, False), (False, True)],
                         ids=["sorted,default_state", "unsorted,given_state"])
def test_compile_fullgraph_packed_sequence(enforce_sorted, given_state):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PackedTagger()
    compiled = torch.compile(model, fullgraph=True)
    for T, lengths in ((6, [6, 2, 4] if not enforce_sorted else [6, 4, 2]), (5, [5, 5, 3, 1])):
        x = torch.randn(T, len(lengths), 4, requires_grad=True)
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        hx = (torch.randn(2, len(lengths), 3), torch.randn(2, len(lengths), 6)) if given_state \
            else None
        got, want = compiled(packed, hx), model(packed, hx)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        leaves = [x, *model.parameters()]
        # (retain_graph: the packing of x is shared by both graphs)
        grads_e = torch.autograd.grad(sum((t * t).sum() for t in want), leaves, retain_graph=True)
        grads_c = torch.autograd.grad(sum((t * t).sum() for t in got), leaves)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_sizes,message", [
    ([2, 3], "non-increasing"), ([3, 3], "more rows"), ([3, 1], "under torch.compile")])
def test_compile_checks_batch_sizes_at_run_time(batch_sizes, message):
    # The checks of the batch sizes' values are part of the graph. Batch sizes that sum to fewer
    # rows than the data (which eager mode runs, as torch.nn.LSTM does) are refused there, so that
    # the output keeps the data's size.
    torch._dynamo.reset()
    model = PackedTagger()
    compiled = torch.compile(model, fullgraph=True)
    good = PackedSequence(torch.randn(5, 4), torch.tensor([3, 2]), None, None)
    torch.testing.assert_close(compiled(good)[0], model(good)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=message):
        compiled(PackedSequence(torch.randn(5, 4), torch.tensor(batch_sizes), None, None))

"""torch.compile(fullgraph=True) of models using fastlstm.LSTM: no graph break, eager results."""
import pytest
import torch
from torch import nn

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

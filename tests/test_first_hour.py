"""Defects a user meets in the first hour (issue 10): replace_lstm on real models, in-place edits,
saturated gates, odd but legal bias shapes."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import fastlstm
from helpers import make_pair


class _Model(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.proj_size or lstm.hidden_size, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _parametrized(kind):
    lstm = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    if kind == "parametrize":
        class Scale(nn.Module):
            def forward(self, w):
                return 0.5 * w
        parametrize.register_parametrization(lstm, "weight_hh_l0", Scale())
    elif kind == "parametrizations.weight_norm":
        parametrizations.weight_norm(lstm, "weight_ih_l1")
    elif kind == "parametrizations.spectral_norm":
        parametrizations.spectral_norm(lstm, "weight_hh_l1")
    elif kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(lstm, "weight_hh_l0")
    elif kind == "spectral_norm":
        torch.nn.utils.spectral_norm(lstm, "weight_ih_l0")
    elif kind == "prune":
        prune.l1_unstructured(lstm, "weight_ih_l0", amount=0.5)
    return lstm


@pytest.mark.parametrize("kind", ["parametrize", "parametrizations.weight_norm",
                                  "parametrizations.spectral_norm", "weight_norm", "spectral_norm",
                                  "prune"])
def test_replace_lstm_keeps_parametrizations(kind):
    torch.manual_seed(0)
    model = _Model(_parametrized(kind)).double().eval()  # eval: spectral norm stops iterating
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = model(x)
    params = dict(model.named_parameters())
    fastlstm.replace_lstm(model)
    assert isinstance(model.lstm, fastlstm.LSTM) and not isinstance(model.lstm, nn.LSTM)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x), expected)
    # The parametrization still acts: gradients reach the original parameters.
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_replace_lstm_keeps_hooks():
    lstm = nn.LSTM(3, 4, dtype=torch.float64)
    calls = []
    lstm.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    lstm.register_forward_hook(lambda m, args, out: calls.append("post"))
    lstm.register_forward_hook(lambda m, args, kwargs, out: calls.append("post-kw"), with_kwargs=True)
    model = nn.Sequential(lstm)
    fastlstm.replace_lstm(model)
    assert isinstance(model[0], fastlstm.LSTM)
    model(torch.randn(2, 1, 3, dtype=torch.float64))
    assert calls == ["pre", "post", "post-kw"]


def test_replace_lstm_leaves_subclasses_with_a_warning():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model = nn.Sequential(MyLSTM(3, 4))
    with pytest.warns(UserWarning, match="left .*MyLSTM.* unchanged"):
        fastlstm.replace_lstm(model)
    assert type(model[0]) is MyLSTM


def test_replace_lstm_bare_module_leaves_the_original():
    lstm = nn.LSTM(3, 4)
    fast = fastlstm.replace_lstm(lstm)
    assert type(lstm) is nn.LSTM and isinstance(fast, fastlstm.LSTM)
    assert fast.weight_ih_l0 is lstm.weight_ih_l0
    fast.weight_hh_l0 = nn.Parameter(torch.zeros(16, 4))  # changing the copy leaves the original
    assert lstm.weight_hh_l0.abs().sum() > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_float64_output_may_be_edited_in_place_before_backward(bidirectional):
    # torch.nn.LSTM's float64 path allows this (its output is not what it saved for backward).
    fast, ref = make_pair(3, 4, dtype=torch.float64, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for module in (fast, ref):
        inp = x.clone().requires_grad_()
        out, _ = module(inp)
        out.relu_()
        out.square().sum().backward()
        grads.append(inp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_float32_output_edited_in_place_raises_like_torch():
    # torch.nn.LSTM's float32 (oneDNN) path saves its output and says so; so does fastlstm, which
    # keeps the memory of a copy that only float64 pays.
    for module in make_pair(3, 4, dtype=torch.float32):
        out, _ = module(torch.randn(5, 2, 3, requires_grad=True))
        out.relu_()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_bias_of_shape_1_by_4h_broadcasts_like_torch():
    fast, ref = make_pair(3, 4)
    for m in (fast, ref):
        m.bias_ih_l0 = nn.Parameter(ref.bias_ih_l0.detach().clone().view(1, 16))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], ref(x)[0])


@pytest.mark.parametrize("scale", [1e30, float("inf")])
def test_float32_saturated_gates_match_torch(scale):
    # A saturated sigmoid is exactly 0 or 1 in torch, and so is its gradient factor s * (1 - s): an
    # exp clamped short of float32's overflow would leave a 1e-35 and non-zero gradients; an Inf input
    # gives NaN gradients in torch.
    fast, ref = make_pair(3, 4, dtype=torch.float32)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = scale
    x[2, 1, 1] = -scale
    grads = []
    for module in (fast, ref):
        module.zero_grad()
        out, (h, c) = module(x)
        (out.sum() + c.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
        grads[-1]["out"] = out.detach()
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.isinf(), b.isinf()), name
        finite = a.isfinite() & b.isfinite()
        assert torch.equal(a[finite] == 0, b[finite] == 0), name
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-5)

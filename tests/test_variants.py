"""The variants (issue 29, docs/variants.md): zoneout, weight drop, layer normalisation and cell
clipping on fastlstm.LSTM and fastlstm.LSTMCell.

The oracle rebuilds a module's forward from fastlstm.reference.lstm_variant_layer (lstm_variant_step
for the cell) and draws its random masks from torch's generator in the order docs/variants.md
documents, so that one seed gives both sides the same masks. Against it, in float64: outputs,
states and every gradient, in training and evaluation, with layers, directions, proj_size, bias,
batch_first, dropout, PackedSequence, lengths= and unbatched input; gradcheck and gradgradcheck
with the masks fixed by seeding. The masks' rates, and that they are redrawn per step / per call,
are read off the module's own outputs and gradients (a kept state equals its previous value
exactly; a dropped weight gets a zero gradient). Also: construction errors, parameters, state_dict
and repr; the default module is the plain LSTM, bitwise; bfloat16 and float16 against float64
within a multiple of plain PyTorch's own error in that dtype; torch.compile, torch.export and
ONNX."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm import ops, reference
from helpers import low_precision_atol

F64 = torch.float64
LN_NAMES = ("layer_norm_weight_ih", "layer_norm_weight_hh", "layer_norm_weight_c",
            "layer_norm_bias_c")


# ---- the oracle ----------------------------------------------------------------------------------

def _pair(zoneout):
    return zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)


def _zoneout_arg(z, shape, training, mask_dtype, dtype):
    """docs/variants.md: off at 0; in evaluation the float z; in training a Bernoulli(z) mask
    drawn as torch.empty(shape, dtype=cell dtype).bernoulli_(z)."""
    if z == 0:
        return None
    if not training:
        return z
    return torch.empty(shape, dtype=mask_dtype).bernoulli_(z).to(dtype)


def _dropped(w_hh, p, drop_dtype):
    # F.dropout(w_hh, p), with the mask drawn in drop_dtype (the module's weights' dtype), so that a
    # float64 oracle reproduces a bfloat16 module's mask: dropout multiplies by a drawn
    # keep / (1 - p), which is what the product below does.
    keep = F.dropout(torch.ones_like(w_hh, dtype=drop_dtype), p, training=True)
    return w_hh * keep.to(w_hh.dtype)


def oracle_lstm(m, x, h0, c0, lengths=None, params=None, mask_dtype=None, drop_dtype=None):
    """m's forward from fastlstm.reference: x [T, B, I] time-major, h0 [L*D, B, P], c0 [L*D, B, H];
    params: name -> tensor to use instead of m's (e.g. float64 copies); masks drawn in mask_dtype
    (default: the cell dtype of x) and weight-drop masks in drop_dtype (default: the weight's)."""
    params = dict(m.named_parameters()) if params is None else params
    D = 2 if m.bidirectional else 1
    H, P = m.hidden_size, m.proj_size or m.hidden_size
    T, B = x.shape[0], x.shape[1]
    z_c, z_h = _pair(m.zoneout)
    mask_dtype = mask_dtype or ops.cell_dtype(x.dtype)
    layer_input, h_n, c_n = x, [], []
    for layer in range(m.num_layers):
        outputs = []
        for d in range(D):
            k, suffix = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")

            def p(name, suffix=suffix):
                return params[name + suffix]

            w_hh = p("weight_hh")
            if m.training and m.weight_drop:
                w_hh = _dropped(w_hh, m.weight_drop, drop_dtype or w_hh.dtype)
            mc = _zoneout_arg(z_c, (T, B, H), m.training, mask_dtype, x.dtype)
            mh = _zoneout_arg(z_h, (T, B, P), m.training, mask_dtype, x.dtype)
            out, h, c = reference.lstm_variant_layer(
                layer_input, h0[k], c0[k], p("weight_ih"), w_hh,
                p("bias_ih") if m.bias else None, p("bias_hh") if m.bias else None,
                p("weight_hr") if m.proj_size else None, lengths, d == 1, mc, mh, m.cell_clip,
                tuple(p(n) for n in LN_NAMES) if m.layer_norm else None)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 2)
        if m.training and m.dropout and layer < m.num_layers - 1:
            layer_input = F.dropout(layer_input, m.dropout, training=True)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def oracle_cell(cell, x, h, c, params=None, mask_dtype=None):
    """One LSTMCell step from fastlstm.reference.lstm_variant_step (masks [1, B, H], c's first)."""
    params = dict(cell.named_parameters()) if params is None else params
    B, H = x.shape[0], cell.hidden_size
    z_c, z_h = _pair(cell.zoneout)
    mask_dtype = mask_dtype or ops.cell_dtype(x.dtype)
    mc = _zoneout_arg(z_c, (1, B, H), cell.training, mask_dtype, x.dtype)
    mh = _zoneout_arg(z_h, (1, B, H), cell.training, mask_dtype, x.dtype)
    bias = params["bias_ih"] + params["bias_hh"] if cell.bias else None
    return reference.lstm_variant_step(
        F.linear(x, params["weight_ih"]), h, c, params["weight_hh"], bias, None,
        mc[0] if isinstance(mc, torch.Tensor) else mc,
        mh[0] if isinstance(mh, torch.Tensor) else mh,
        cell.cell_clip, tuple(params[n] for n in LN_NAMES) if cell.layer_norm else None)


# ---- running both --------------------------------------------------------------------------------

VARIANTS = {
    "zoneout": dict(zoneout=0.3),
    "zoneout_pair": dict(zoneout=(0.2, 0.5)),
    "zoneout_h_only": dict(zoneout=(0.0, 0.4)),
    "weight_drop": dict(weight_drop=0.4),
    "layer_norm": dict(layer_norm=True),
    "cell_clip": dict(cell_clip=0.3),
    "zoneout+layer_norm": dict(zoneout=0.25, layer_norm=True),
    "weight_drop+cell_clip": dict(weight_drop=0.3, cell_clip=0.5),
    "zoneout+weight_drop": dict(zoneout=0.2, weight_drop=0.5),
    "all": dict(zoneout=(0.2, 0.3), weight_drop=0.3, layer_norm=True, cell_clip=0.5),
}
MODULES = {
    "plain": dict(),
    "2-layers,bidir,dropout": dict(num_layers=2, bidirectional=True, dropout=0.3),
    "proj,no-bias": dict(proj_size=2, bias=False),
    "2-layers,bidir,proj": dict(num_layers=2, bidirectional=True, proj_size=3),
}


def make_lstm(I=4, H=5, dtype=F64, **kwargs):
    m = fastlstm.LSTM(I, H, dtype=dtype, **kwargs)
    if m.layer_norm:
        # Away from the identity initialisation, so that each layer-norm parameter matters.
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("layer_norm"):
                    p.add_(0.3 * torch.randn_like(p))
    return m


def loss_of(*tensors):
    g = torch.Generator().manual_seed(1)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in tensors)


def grads(out, h, c, leaves):
    return torch.autograd.grad(loss_of(out, h, c), leaves, allow_unused=False)


def assert_all_close(got, want, rtol=1e-7, atol=1e-9):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        # atol grows with the magnitude of sums over steps and rows (weight gradients).
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def run_module_and_oracle(m, form="padded", given_state=True, seed=7, T=5, B=3):
    """(module's, oracle's) results: output [T, B, D*P] padded with zeros past each length, h_n,
    c_n, then the gradients of x, h0, c0 (those given) and every parameter."""
    I, H = m.input_size, m.hidden_size
    D, P = 2 if m.bidirectional else 1, m.proj_size or m.hidden_size
    L = m.num_layers * D
    if form == "unbatched":
        B = 1
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    h0 = torch.randn(L, B, P, dtype=F64, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=F64, requires_grad=True)
    lengths = torch.tensor([T, 2, T - 1][:B])
    leaves = [x, h0, c0] if given_state else [x]
    params = list(m.parameters())

    torch.manual_seed(seed)
    hx = (h0, c0) if given_state else None
    if form in ("padded", "batch_first"):
        bf = form == "batch_first"
        assert m.batch_first == bf
        out, (h, c) = m(x.transpose(0, 1) if bf else x, hx)
        out = out.transpose(0, 1) if bf else out
    elif form == "lengths":
        out, (h, c) = m(x, hx, lengths=lengths)
    elif form == "packed":
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = m(packed, hx)
        out = pad_packed_sequence(out, total_length=T)[0]
    elif form == "unbatched":
        out, (h, c) = m(x[:, 0], (h0[:, 0], c0[:, 0]) if given_state else None)
        assert out.dim() == 2 and h.dim() == 2
        out, h, c = out.unsqueeze(1), h.unsqueeze(1), c.unsqueeze(1)
    got = (out, h, c, *grads(out, h, c, leaves + params))

    torch.manual_seed(seed)
    s0, c_0 = (h0, c0) if given_state else (torch.zeros_like(h0), torch.zeros_like(c0))
    if form == "packed":
        order = packed.sorted_indices
        out, h, c = oracle_lstm(m, x[:, order], s0[:, order], c_0[:, order], lengths[order])
        back = packed.unsorted_indices
        out, h, c = out[:, back], h[:, back], c[:, back]
    else:
        out, h, c = oracle_lstm(m, x, s0, c_0, lengths if form == "lengths" else None)
    want = (out, h, c, *grads(out, h, c, leaves + params))
    return got, want


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, module, training):
    m = make_lstm(**VARIANTS[variant], **MODULES[module]).train(training)
    got, want = run_module_and_oracle(m)
    assert_all_close(got, want)


FORMS = ["padded", "batch_first", "lengths", "packed", "unbatched", "default_state"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", ["zoneout_pair", "weight_drop", "layer_norm", "all"])
def test_input_forms_match_reference(variant, form, training):
    m = make_lstm(**VARIANTS[variant], num_layers=2, bidirectional=True, proj_size=3, dropout=0.3,
                  batch_first=form == "batch_first").train(training)
    if form == "default_state":
        got, want = run_module_and_oracle(m, given_state=False)
    else:
        got, want = run_module_and_oracle(m, form)
    assert_all_close(got, want)


def test_oracle_comparison_sees_the_masks():
    # The comparison can fail: other masks (another seed) give other results.
    m = make_lstm(**VARIANTS["all"], num_layers=2)
    got, _ = run_module_and_oracle(m, seed=1)
    _, want = run_module_and_oracle(m, seed=2)
    assert not torch.allclose(got[0], want[0])


def test_cell_clip_clips():
    m = make_lstm(cell_clip=0.05)
    x = torch.randn(6, 4, 4, dtype=F64)
    c0 = torch.randn(1, 4, 5, dtype=F64) * 3
    _, (_, c) = m(x, (torch.zeros(1, 4, 5, dtype=F64), c0))
    assert c.abs().max() <= 0.05
    _, (_, c_free) = make_lstm()(x, (torch.zeros(1, 4, 5, dtype=F64), c0))
    assert c_free.abs().max() > 0.05


def test_double_backward_matches_reference():
    m = make_lstm(**VARIANTS["all"], proj_size=3, bidirectional=True)
    x = torch.randn(4, 2, 4, dtype=F64, requires_grad=True)
    results = []
    for run in (lambda: m(x)[0], lambda: oracle_lstm(m, x, *(torch.zeros(2, 2, n, dtype=F64)
                                                            for n in (3, 5)))[0]):
        torch.manual_seed(3)
        out = run()
        (gx,) = torch.autograd.grad(loss_of(out), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *m.parameters()]))
    assert_all_close(*results)


# ---- gradcheck / gradgradcheck with the masks fixed by seeding -----------------------------------

def _functional(m, names, seed, **call):
    def f(x, h0, c0, *params):
        torch.manual_seed(seed)
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, params)), (x, (h0, c0)),
                                                 call)
        return out, h, c
    return f


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [dict(bidirectional=True, proj_size=1),
                                    dict(num_layers=2, dropout=0.3)],
                         ids=["bidir,proj", "2-layers,dropout"])
def test_gradcheck(kwargs, training):
    m = make_lstm(I=2, H=2, **VARIANTS["all"], **kwargs).train(training)
    D, P = 2 if m.bidirectional else 1, m.proj_size or 2
    names, params = zip(*m.named_parameters())
    inputs = (torch.randn(3, 2, 2, dtype=F64), torch.randn(m.num_layers * D, 2, P, dtype=F64),
              torch.randn(m.num_layers * D, 2, 2, dtype=F64),
              *(p.detach().clone() for p in params))
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(_functional(m, names, seed=5), inputs)


@pytest.mark.parametrize("variant", ["zoneout_pair", "layer_norm", "all"])
def test_gradgradcheck(variant):
    m = make_lstm(I=2, H=2, **VARIANTS[variant], proj_size=1)
    names, params = zip(*m.named_parameters())
    inputs = (torch.randn(3, 2, 2, dtype=F64), torch.randn(1, 2, 1, dtype=F64),
              torch.randn(1, 2, 2, dtype=F64), *(p.detach().clone() for p in params))
    inputs = tuple(t.requires_grad_() for t in inputs)
    f = _functional(m, names, seed=5)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_lengths():
    m = make_lstm(I=2, H=3, **VARIANTS["all"], bidirectional=True)
    names, params = zip(*m.named_parameters())
    inputs = (torch.randn(4, 3, 2, dtype=F64), torch.randn(2, 3, 3, dtype=F64),
              torch.randn(2, 3, 3, dtype=F64), *(p.detach().clone() for p in params))
    inputs = tuple(t.requires_grad_() for t in inputs)
    f = _functional(m, names, seed=5, lengths=torch.tensor([4, 1, 2]))
    assert torch.autograd.gradcheck(f, inputs)


# ---- the masks: rates and redraws, read off the module's outputs ---------------------------------

def _binomial_ok(fraction, p, n, sigmas=5.0):
    return abs(fraction - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _kept_h(m, x, h0):
    """[T, B, P] bool: where the forward direction's h_t equals h_{t-1} exactly (kept by zoneout)."""
    out, _ = m(x, (h0, torch.zeros(1, x.shape[1], m.hidden_size, dtype=x.dtype)))
    prev = torch.cat([h0, out[:-1]])
    return out == prev


def test_zoneout_h_mask_rate_and_redrawn_per_step_and_call():
    z, T, B, H = 0.3, 6, 32, 64
    m = make_lstm(I=4, H=H, zoneout=(0.0, z))
    x, h0 = torch.randn(T, B, 4, dtype=F64), torch.randn(1, B, H, dtype=F64)
    kept = _kept_h(m, x, h0)
    for t in range(T):
        assert _binomial_ok(kept[t].double().mean().item(), z, B * H), t
    assert _binomial_ok(kept.double().mean().item(), z, T * B * H)
    # Redrawn per step: two steps agree where both keep or both don't, z^2 + (1 - z)^2 of the time.
    for t in range(T - 1):
        same = (kept[t] == kept[t + 1]).double().mean().item()
        assert _binomial_ok(same, z * z + (1 - z) ** 2, B * H), t
    # Redrawn per call.
    again = _kept_h(m, x, h0)
    assert _binomial_ok((again == kept).double().mean().item(), z * z + (1 - z) ** 2, T * B * H)
    # Evaluation keeps nothing exactly: the expectation mixes the two values.
    assert not _kept_h(m.eval(), x, h0).any()


def test_zoneout_c_mask_rate_and_independent_steps():
    # c_n equals c_0 exactly where every step kept it: z for one step, z^3 for three independent
    # steps (z if one mask served all steps).
    z, B, H = 0.5, 64, 64
    m = make_lstm(I=4, H=H, zoneout=(z, 0.0))
    c0 = torch.randn(1, B, H, dtype=F64)
    for T, rate in ((1, z), (3, z ** 3)):
        _, (_, c) = m(torch.randn(T, B, 4, dtype=F64), (torch.randn(1, B, H, dtype=F64), c0))
        assert _binomial_ok((c == c0).double().mean().item(), rate, B * H), T
    x, h0 = torch.randn(1, B, 4, dtype=F64), torch.randn(1, B, H, dtype=F64)
    first = m(x, (h0, c0))[1][1] == c0
    second = m(x, (h0, c0))[1][1] == c0
    assert _binomial_ok((first == second).double().mean().item(), z * z + (1 - z) ** 2, B * H)


def test_zoneout_masks_differ_per_layer_and_direction():
    z, T, B, H = 0.5, 4, 16, 32
    m = make_lstm(I=4, H=H, zoneout=(0.0, z), bidirectional=True, num_layers=2)
    x = torch.randn(T, B, 4, dtype=F64)
    h0 = torch.randn(4, B, H, dtype=F64)
    out, _ = m(x, (h0, torch.zeros(4, B, H, dtype=F64)))
    fwd, rev = out[..., :H], out[..., H:]
    kept_fwd = fwd == torch.cat([h0[2:3], fwd[:-1]])
    kept_rev = rev == torch.cat([rev[1:], h0[3:4]])
    assert _binomial_ok(kept_rev.double().mean().item(), z, T * B * H)
    assert _binomial_ok((kept_fwd == kept_rev).double().mean().item(), 0.5, T * B * H)


def _dropped_pattern(m, x, h0):
    """Where weight_hh_l0's gradient is exactly zero (its weight was dropped for the call)."""
    out, (h, c) = m(x, (h0, torch.zeros_like(h0)))
    (g,) = torch.autograd.grad(loss_of(out, h, c), [m.weight_hh_l0])
    return g == 0


def test_weight_drop_rate_same_mask_every_step_and_redrawn_per_call():
    # With one mask for all T = 4 steps a dropped weight gets no gradient from any step: a fraction
    # p of zeros (a mask per step would leave p^4).
    p, H = 0.4, 48
    m = make_lstm(I=4, H=H, weight_drop=p)
    x, h0 = torch.randn(4, 8, 4, dtype=F64), torch.randn(1, 8, H, dtype=F64)
    first = _dropped_pattern(m, x, h0)
    assert _binomial_ok(first.double().mean().item(), p, 4 * H * H)
    second = _dropped_pattern(m, x, h0)
    assert _binomial_ok((first == second).double().mean().item(), p * p + (1 - p) ** 2, 4 * H * H)
    # Evaluation: the weights as they are.
    assert not _dropped_pattern(m.eval(), x, h0).any()


def test_weight_drop_uses_the_dropped_weight_at_every_step():
    # One layer, one direction, weight drop alone: the call's first random draw is weight_hh_l0's
    # mask (docs/variants.md), so F.dropout after the same seed gives the weight the call ran with.
    m = make_lstm(weight_drop=0.5)
    x, h0, c0 = (torch.randn(2, 3, n, dtype=F64) for n in (4, 5, 5))
    h0, c0 = h0[:1], c0[:1]
    torch.manual_seed(11)
    out, (h, c) = m(x, (h0, c0))
    torch.manual_seed(11)
    w_hh = F.dropout(m.weight_hh_l0, 0.5, training=True)
    want = reference.lstm_layer(x, h0[0], c0[0], m.weight_ih_l0, w_hh, m.bias_ih_l0, m.bias_hh_l0)
    assert_all_close((out, h[0], c[0]), want)


def test_evaluation_draws_nothing_and_is_deterministic():
    m = make_lstm(**VARIANTS["all"], num_layers=2, dropout=0.5).eval()
    x = torch.randn(5, 3, 4, dtype=F64)
    state = torch.get_rng_state()
    first = m(x)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(m(x)[0], first)


def test_seed_reproduces_a_training_run():
    m = make_lstm(**VARIANTS["all"], num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 4, dtype=F64)
    torch.manual_seed(4)
    first = m(x)[0]
    torch.manual_seed(4)
    assert torch.equal(m(x)[0], first)
    assert not torch.equal(m(x)[0], first)


# ---- the default module is the plain LSTM --------------------------------------------------------

def _no_variant_layer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a module without variants called ops.lstm_variant_layer")
    monkeypatch.setattr(ops, "lstm_variant_layer", refuse)


@pytest.mark.parametrize("kwargs", [dict(), dict(zoneout=0.0, weight_drop=0.0, layer_norm=False,
                                                 cell_clip=None),
                                    dict(zoneout=(0.0, 0.0))], ids=["no-kwargs", "zeros", "pair"])
def test_default_module_is_the_plain_lstm_bitwise(kwargs, monkeypatch):
    _no_variant_layer(monkeypatch)
    torch.manual_seed(0)
    m = fastlstm.LSTM(4, 5, dtype=F64, **kwargs)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 5, dtype=F64)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert repr(m) == repr(ref)
    x = torch.randn(6, 3, 4, dtype=F64, requires_grad=True)
    state = torch.get_rng_state()
    out, (h, c) = m(x)  # training mode: draws nothing
    assert torch.equal(torch.get_rng_state(), state)
    zeros = torch.zeros(3, 5, dtype=F64)
    want = ops.lstm_layer(x, zeros, zeros, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0,
                          m.bias_hh_l0)
    for a, b in zip((out, h[0], c[0]), want):
        assert torch.equal(a, b)
    ga = grads(out, h, c, [x, *m.parameters()])
    gb = grads(want[0], want[1].unsqueeze(0), want[2].unsqueeze(0), [x, *m.parameters()])
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)


def test_weight_drop_in_evaluation_is_the_plain_lstm_bitwise(monkeypatch):
    _no_variant_layer(monkeypatch)
    kw = dict(num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float32)
    m = fastlstm.LSTM(4, 5, weight_drop=0.5, **kw).eval()
    plain = fastlstm.LSTM(4, 5, **kw).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(6, 3, 4)
    for a, b in zip(m(x)[0:1] + m(x)[1], plain(x)[0:1] + plain(x)[1]):
        assert torch.equal(a, b)


def test_default_matches_torch_lstm():
    m = fastlstm.LSTM(4, 5, 2, bidirectional=True, dtype=F64)
    ref = torch.nn.LSTM(4, 5, 2, bidirectional=True, dtype=F64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 3, 4, dtype=F64)
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-7, atol=1e-9)


# ---- construction, parameters, state_dict, repr --------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(zoneout=1.0), "zoneout"), (dict(zoneout=-0.1), "zoneout"),
    (dict(zoneout=(0.1, 1.0)), "zoneout"), (dict(zoneout=(0.1,)), "zoneout"),
    (dict(zoneout=(0.1, 0.2, 0.3)), "zoneout"), (dict(zoneout="0.1"), "zoneout"),
    (dict(zoneout=True), "zoneout"), (dict(zoneout=float("nan")), "zoneout"),
    (dict(zoneout=None), "zoneout"),
    (dict(weight_drop=1.0), "weight_drop"), (dict(weight_drop=-0.5), "weight_drop"),
    (dict(weight_drop=None), "weight_drop"), (dict(weight_drop=(0.1, 0.2)), "weight_drop"),
    (dict(cell_clip=0.0), "cell_clip"), (dict(cell_clip=-1.0), "cell_clip"),
    (dict(cell_clip="3"), "cell_clip"), (dict(cell_clip=float("nan")), "cell_clip"),
    (dict(layer_norm=1), "layer_norm"), (dict(layer_norm="yes"), "layer_norm"),
])
def test_bad_values_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fastlstm.LSTM(3, 4, **kwargs)
    if "weight_drop" not in kwargs:
        with pytest.raises(ValueError, match=name):
            fastlstm.LSTMCell(3, 4, **kwargs)


def test_good_values_are_accepted():
    for kwargs in (dict(zoneout=0), dict(zoneout=0.99), dict(zoneout=[0.1, 0.0]),
                   dict(weight_drop=0), dict(cell_clip=1), dict(cell_clip=float("inf"))):
        fastlstm.LSTM(3, 4, **kwargs)
    assert fastlstm.LSTM(3, 4, zoneout=[0.1, 0]).zoneout == (0.1, 0.0)


def test_options_are_keyword_only_and_cell_has_no_weight_drop():
    with pytest.raises(TypeError):
        fastlstm.LSTMCell(3, 4, True, None, None, 0.1)
    with pytest.raises(TypeError):
        fastlstm.LSTMCell(3, 4, weight_drop=0.1)


def _ln_names(suffixes):
    return [n + s for s in suffixes for n in LN_NAMES]


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2),
                                    dict(bias=False, num_layers=3)])
def test_layer_norm_parameters_names_shapes_init_and_torch_init_unchanged(kwargs):
    torch.manual_seed(5)
    ref = torch.nn.LSTM(3, 4, **kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    m = fastlstm.LSTM(3, 4, layer_norm=True, zoneout=0.1, weight_drop=0.2, cell_clip=2.0,
                      **kwargs)
    after = torch.rand(3)
    assert torch.equal(after, after_ref)  # construction draws what torch.nn.LSTM's does
    D = 2 if m.bidirectional else 1
    suffixes = [f"_l{k}{'_reverse' if d else ''}" for k in range(m.num_layers) for d in range(D)]
    names = [n for n, _ in ref.named_parameters()] + _ln_names(suffixes)
    assert [n for n, _ in m.named_parameters()] == names
    assert list(m.state_dict()) == names
    params = dict(m.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(params[name], p), name
    for s in suffixes:
        for n, size, value in zip(LN_NAMES, (16, 16, 4, 4), (1, 1, 1, 0)):
            p = params[n + s]
            assert p.shape == (size,) and p.dtype == torch.float32 and p.requires_grad
            assert torch.equal(p, torch.full((size,), float(value)))
    # all_weights and torch's flat weights are torch's own.
    assert [[w.shape for w in layer] for layer in m.all_weights] == \
           [[w.shape for w in layer] for layer in ref.all_weights]
    # reset_parameters: torch's weights as torch.nn.LSTM's for the same seed, layer norm 1, 1, 1, 0.
    with torch.no_grad():
        for s in suffixes:
            params["layer_norm_bias_c" + s].fill_(5)
    torch.manual_seed(9)
    m.reset_parameters()
    torch.manual_seed(9)
    ref.reset_parameters()
    for name, p in ref.named_parameters():
        assert torch.equal(params[name], p), name
    for s in suffixes:
        assert torch.equal(params["layer_norm_bias_c" + s], torch.zeros(4))
        assert torch.equal(params["layer_norm_weight_ih" + s], torch.ones(16))


def test_state_dict_round_trip_and_plain_checkpoints():
    kw = dict(num_layers=2, bidirectional=True)
    m = make_lstm(**kw, layer_norm=True)
    m2 = fastlstm.LSTM(4, 5, **kw, layer_norm=True, dtype=F64)
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(3, 2, 4, dtype=F64)
    assert torch.equal(m.eval()(x)[0], m2.eval()(x)[0])
    # Without layer norm, the state_dict is torch.nn.LSTM's, both ways.
    plain = torch.nn.LSTM(4, 5, **kw)
    zoned = fastlstm.LSTM(4, 5, **kw, zoneout=0.1, weight_drop=0.2, cell_clip=1.0)
    zoned.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(zoned.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        fastlstm.LSTM(4, 5, **kw, layer_norm=True).load_state_dict(plain.state_dict())


def test_extra_repr_shows_only_what_is_on():
    assert repr(fastlstm.LSTM(3, 4, zoneout=0.0, weight_drop=0.0)) == "LSTM(3, 4)"
    assert repr(fastlstm.LSTM(3, 4, 2, zoneout=(0.1, 0.2), weight_drop=0.3, layer_norm=True,
                              cell_clip=2)) == ("LSTM(3, 4, num_layers=2, zoneout=(0.1, 0.2), "
                                                "weight_drop=0.3, layer_norm=True, cell_clip=2.0)")
    assert repr(fastlstm.LSTMCell(3, 4, zoneout=0.1)) == "LSTMCell(3, 4, zoneout=0.1)"
    assert repr(fastlstm.LSTMCell(3, 4)) == repr(torch.nn.LSTMCell(3, 4))


def test_converted_and_old_unpickled_modules_run_plain(monkeypatch):
    fast = fastlstm.replace_lstm(torch.nn.LSTM(3, 4, dtype=F64))
    cell = fastlstm.replace_lstm(torch.nn.LSTMCell(3, 4, dtype=F64))
    old = fastlstm.LSTM(3, 4, dtype=F64)
    for name in ("zoneout", "weight_drop", "cell_clip"):  # as pickled before the variants
        vars(old).pop(name, None)
    old = pickle.loads(pickle.dumps(old))
    _no_variant_layer(monkeypatch)
    for m in (fast, old):
        assert (m.zoneout, m.weight_drop, m.layer_norm, m.cell_clip) == (0.0, 0.0, False, None)
        assert repr(m) == "LSTM(3, 4)"
        m(torch.randn(2, 1, 3, dtype=F64))
    assert (cell.zoneout, cell.layer_norm, cell.cell_clip) == (0.0, False, None)
    cell(torch.randn(2, 3, dtype=F64))


def test_pickle_deepcopy_and_dtype_conversion_keep_the_variants():
    m = make_lstm(**VARIANTS["all"], num_layers=2).eval()
    x = torch.randn(4, 2, 4, dtype=F64)
    want = m(x)[0]
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert repr(other) == repr(m)
        assert torch.equal(other(x)[0], want)
    f32 = copy.deepcopy(m).float()
    assert f32.layer_norm_weight_c_l1.dtype == torch.float32
    torch.testing.assert_close(f32(x.float())[0], want.float(), rtol=1e-4, atol=1e-5)


# ---- LSTMCell ------------------------------------------------------------------------------------

CELL_VARIANTS = {
    "zoneout": dict(zoneout=0.3),
    "zoneout_pair": dict(zoneout=(0.2, 0.5)),
    "zoneout_h_only": dict(zoneout=(0.0, 0.4)),
    "layer_norm": dict(layer_norm=True),
    "cell_clip": dict(cell_clip=0.3),
    "zoneout+layer_norm": dict(zoneout=0.25, layer_norm=True),
    "all": dict(zoneout=(0.2, 0.3), layer_norm=True, cell_clip=0.5),
}


def make_cell(I=4, H=5, dtype=F64, **kwargs):
    cell = fastlstm.LSTMCell(I, H, dtype=dtype, **kwargs)
    if cell.layer_norm:
        with torch.no_grad():
            for name, p in cell.named_parameters():
                if name.startswith("layer_norm"):
                    p.add_(0.3 * torch.randn_like(p))
    return cell


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", list(CELL_VARIANTS))
def test_cell_matches_reference_over_a_decoder_loop(variant, bias, training):
    cell = make_cell(**CELL_VARIANTS[variant], bias=bias).train(training)
    x = torch.randn(3, 5, 4, dtype=F64, requires_grad=True)
    h0, c0 = (torch.randn(5, 5, dtype=F64, requires_grad=True) for _ in range(2))
    results = []
    for step in (lambda x, h, c: cell(x, (h, c)), lambda x, h, c: oracle_cell(cell, x, h, c)):
        torch.manual_seed(2)
        h, c, hs = h0, c0, []
        for t in range(3):
            h, c = step(x[t], h, c)
            hs.append(h)
        out = torch.stack(hs)
        results.append((out, h, c, *grads(out, h, c, [x, h0, c0, *cell.parameters()])))
    assert_all_close(*results)


@pytest.mark.parametrize("variant", ["zoneout_pair", "all"])
def test_cell_unbatched_and_default_state(variant):
    cell = make_cell(**CELL_VARIANTS[variant])
    x = torch.randn(4, dtype=F64)
    torch.manual_seed(3)
    h, c = cell(x)
    assert h.shape == c.shape == (5,)
    torch.manual_seed(3)
    zeros = torch.zeros(1, 5, dtype=F64)
    want = oracle_cell(cell, x.unsqueeze(0), zeros, zeros)
    assert_all_close((h, c), (want[0][0], want[1][0]))


def test_cell_gradcheck_and_gradgradcheck():
    cell = make_cell(I=2, H=3, **CELL_VARIANTS["all"])
    names, params = zip(*cell.named_parameters())

    def f(x, h, c, *params):
        torch.manual_seed(4)
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, (h, c)))

    inputs = (torch.randn(2, 2, dtype=F64), torch.randn(2, 3, dtype=F64),
              torch.randn(2, 3, dtype=F64), *(p.detach().clone() for p in params))
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_cell_zoneout_rate_and_redraw():
    z, B, H = 0.3, 64, 64
    cell = make_cell(I=4, H=H, zoneout=z)
    x, h0, c0 = torch.randn(B, 4, dtype=F64), torch.randn(B, H, dtype=F64), torch.randn(B, H,
                                                                                       dtype=F64)
    h1, c1 = cell(x, (h0, c0))
    h2, c2 = cell(x, (h0, c0))
    for new, old in ((h1, h0), (c1, c0), (h2, h0)):
        assert _binomial_ok((new == old).double().mean().item(), z, B * H)
    assert _binomial_ok(((h1 == h0) == (c1 == c0)).double().mean().item(), z * z + (1 - z) ** 2,
                        B * H)  # c's and h's masks are independent
    assert _binomial_ok(((h1 == h0) == (h2 == h0)).double().mean().item(), z * z + (1 - z) ** 2,
                        B * H)  # redrawn per call
    assert not (cell.eval()(x, (h0, c0))[0] == h0).any()


def test_cell_layer_norm_parameters_and_init():
    torch.manual_seed(1)
    ref = torch.nn.LSTMCell(3, 4)
    torch.manual_seed(1)
    cell = fastlstm.LSTMCell(3, 4, layer_norm=True, zoneout=0.2, cell_clip=1.0)
    names = [n for n, _ in ref.named_parameters()] + list(LN_NAMES)
    assert [n for n, _ in cell.named_parameters()] == names == list(cell.state_dict())
    for n, size, value in zip(LN_NAMES, (16, 16, 4, 4), (1, 1, 1, 0)):
        assert torch.equal(getattr(cell, n), torch.full((size,), float(value)))
    for n, p in ref.named_parameters():
        assert torch.equal(getattr(cell, n), p)
    with torch.no_grad():
        cell.layer_norm_weight_hh.zero_()
    cell.reset_parameters()
    assert torch.equal(cell.layer_norm_weight_hh, torch.ones(16))


def test_cell_default_is_the_plain_cell(monkeypatch):
    _no_variant_layer(monkeypatch)
    cell = fastlstm.LSTMCell(3, 4, dtype=F64, zoneout=0.0, layer_norm=False, cell_clip=None)
    x = torch.randn(2, 3, dtype=F64)
    h, c = cell(x)
    zeros = torch.zeros(2, 4, dtype=F64)
    want = ops.lstm_cell(x, zeros, zeros, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                         cell.bias_hh)
    assert torch.equal(h, want[0]) and torch.equal(c, want[1])


# ---- low precision -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["zoneout_pair", "weight_drop", "layer_norm", "all"])
def test_low_precision_error_within_plain_pytorch_error(variant, training, dtype):
    # Against the float64 oracle with the 16-bit module's weights and masks: our error at most
    # LOW_PRECISION_MULTIPLE times the error of the plain-PyTorch variant run in that dtype (what a
    # user's loop of ATen ops would give), plus that dtype's rounding at the reference's scale.
    m = make_lstm(I=32, H=48, **VARIANTS[variant], num_layers=2).to(dtype).train(training)
    x = torch.randn(20, 8, 32).to(dtype)
    zeros = (torch.zeros(2, 8, 48, dtype=dtype),) * 2
    params64 = {n: p.double() for n, p in m.named_parameters()}
    cell = ops.cell_dtype(dtype)
    with torch.no_grad():
        torch.manual_seed(6)
        ours = m(x)
        ours = (ours[0], *ours[1])
        torch.manual_seed(6)
        exact = oracle_lstm(m, x.double(), *(z.double() for z in zeros), params=params64,
                            mask_dtype=cell, drop_dtype=dtype)
        torch.manual_seed(6)
        theirs = oracle_lstm(m, x, *zeros, mask_dtype=cell)
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == dtype
        err, torch_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= low_precision_atol(dtype, torch_err, e), (err, torch_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cell_low_precision_error_within_plain_pytorch_error(dtype):
    cell = make_cell(I=32, H=48, **CELL_VARIANTS["all"]).to(dtype)
    x, h, c = (torch.randn(8, n).to(dtype) for n in (32, 48, 48))
    params64 = {n: p.double() for n, p in cell.named_parameters()}
    with torch.no_grad():
        torch.manual_seed(6)
        ours = cell(x, (h, c))
        torch.manual_seed(6)
        exact = oracle_cell(cell, x.double(), h.double(), c.double(), params=params64,
                            mask_dtype=torch.float32)
        torch.manual_seed(6)
        theirs = oracle_cell(cell, x, h, c, mask_dtype=torch.float32)
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == dtype
        err, torch_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= low_precision_atol(dtype, torch_err, e), (err, torch_err)


def test_autocast_casts_the_layer_norm_parameters():
    m = make_lstm(I=8, H=8, dtype=torch.float32, layer_norm=True, zoneout=0.1, proj_size=4).eval()
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    # proj_size: torch.nn.LSTM's rule casts the matrix products only; output in the gates' dtype.
    assert out.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x)[0], rtol=0.05, atol=0.05)


# ---- torch.compile, torch.export, ONNX -----------------------------------------------------------

def _variant_model(**kwargs):
    return make_lstm(I=4, H=6, dtype=torch.float32, zoneout=(0.1, 0.2), layer_norm=True,
                     cell_clip=1.0, weight_drop=0.2, proj_size=3, **kwargs)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    m = _variant_model()
    x = torch.randn(3, 2, 4)
    compiled = torch.compile(m, fullgraph=True)
    for training in (False, True):
        m.train(training)
        results = []
        for run in (compiled, m):
            # fallback_random: the compiled graph draws its masks with torch's generator, as eager.
            with torch._inductor.config.patch(fallback_random=True):
                torch.manual_seed(1)
                out, (h, c) = run(x)
            results.append((out, h, c, *grads(out, h, c, list(m.parameters()))))
        assert_all_close(*results, rtol=1e-5, atol=1e-6)


def _fused_variant_op():
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastlstm::lstm_variant_forward", "CPU")


def test_export_dynamic_batch():
    m = _variant_model(bidirectional=True).eval()
    ep = torch.export.export(m, (torch.randn(5, 3, 4),),
                             dynamic_shapes=({1: torch.export.Dim("B")},))
    x = torch.randn(5, 7, 4)
    for a, b in zip(ep.module()(x)[0:1], m(x)[0:1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(not _fused_variant_op(), strict=True,
                   reason="ops.lstm_variant_layer runs the reference's Python loop over T (no "
                          "fused variant op yet), which torch.export specialises to one T")
def test_export_dynamic_time_and_batch():
    m = _variant_model(bidirectional=True).eval()
    dims = ({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},)
    ep = torch.export.export(m, (torch.randn(5, 3, 4),), dynamic_shapes=dims)
    x = torch.randn(9, 7, 4)
    torch.testing.assert_close(ep.module()(x)[0], m(x)[0], rtol=1e-5, atol=1e-6)


def test_onnx_export_in_evaluation_through_scan():
    onnx = pytest.importorskip("onnx", reason="needs the test extra: pip install onnx")
    pytest.importorskip("onnxscript", reason="needs the test extra: pip install onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="needs the test extra")
    m = make_lstm(I=5, H=7, dtype=torch.float32, zoneout=(0.1, 0.3), layer_norm=True,
                  cell_clip=0.5, weight_drop=0.2, num_layers=2, bidirectional=True).eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    prog = torch.onnx.export(m, (torch.randn(4, 3, 5),), dynamo=True, verbose=False,
                             dynamic_shapes=({0: T, 1: B},))
    proto = prog.model_proto
    onnx.checker.check_model(proto)
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("Scan") == 4 and "LSTM" not in kinds  # one Scan per layer and direction
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for t, b in ((4, 3), (9, 6), (1, 1)):
        x = torch.randn(t, b, 5)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            out, (h, c) = m(x)
        for g, w in zip(got, (out, h, c)):
            # float32, summed in another order; layer norm divides by small deviations.
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


def _op_types(graph, found=None):
    found = set() if found is None else found
    for node in graph.node:
        found.add(node.op_type)
        for a in node.attribute:
            for g in [a.g, *a.graphs]:
                _op_types(g, found)
    return found


def test_onnx_export_with_lengths_batch_first():
    onnx = pytest.importorskip("onnx", reason="needs the test extra: pip install onnx")
    pytest.importorskip("onnxscript", reason="needs the test extra: pip install onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="needs the test extra")
    m = make_lstm(I=5, H=7, dtype=torch.float32, zoneout=(0.1, 0.3), layer_norm=True,
                  cell_clip=0.5, bidirectional=True, batch_first=True).eval()
    B, T = torch.export.Dim("B"), torch.export.Dim("T")
    prog = torch.onnx.export(m, (torch.randn(3, 4, 5),),
                             kwargs={"lengths": torch.tensor([4, 2, 3])}, dynamo=True, verbose=False,
                             dynamic_shapes={"input": {0: B, 1: T}, "lengths": {0: B}})
    onnx.checker.check_model(prog.model_proto)
    assert {"Scan", "LayerNormalization", "Clip"} <= _op_types(prog.model_proto.graph)
    session = ort.InferenceSession(prog.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x, lengths = torch.randn(5, 11, 5), torch.tensor([11, 1, 4, 9, 6])
    got = session.run(None, {"input": x.numpy(), "lengths": lengths.numpy()})
    with torch.no_grad():
        out, (h, c) = m(x, lengths=lengths)
    for g, w in zip(got, (out, h, c)):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,named", [(dict(zoneout=0.1), "zoneout"),
                                          (dict(weight_drop=0.2, layer_norm=True), "weight_drop")])
def test_onnx_export_in_training_is_refused_naming_the_option(kwargs, named):
    pytest.importorskip("onnxscript", reason="needs the test extra: pip install onnxscript")
    m = fastlstm.LSTM(5, 7, **kwargs)
    with pytest.raises(Exception) as info:
        torch.onnx.export(m, (torch.randn(4, 3, 5),), dynamo=True, verbose=False)
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, RuntimeError):
        cause = cause.__cause__
    message = str(info.value) + str(cause)
    assert named in message and "model.eval()" in message

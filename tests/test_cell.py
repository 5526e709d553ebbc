"""fastlstm.LSTMCell against torch.nn.LSTMCell: construction, parameters and state_dict; outputs and
every gradient (one step and a chained decoder loop); gradcheck, gradgradcheck; opcheck on the cell
ops; compile fullgraph; errors; replace_lstm; CUDA (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

import fastlstm
from helpers import TOL

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def make_cells(I, H, dtype=torch.float64, device="cpu", bias=True):
    ref = torch.nn.LSTMCell(I, H, bias=bias, dtype=dtype, device=device)
    fast = fastlstm.LSTMCell(I, H, bias=bias, dtype=dtype, device=device)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def loss_of(h, c):
    g = torch.Generator().manual_seed(1)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)
    wc = torch.randn(c.shape, generator=g, dtype=c.dtype).to(c.device)
    return (h * wh).sum() + (c * wc).sum()


def step_and_grads(cell, x, hx, steps=1):
    h, c = hx if hx is not None else (None, None)
    state = hx
    loss = 0
    for _ in range(steps):
        h, c = cell(x, state)
        state = (h, c)
        loss = loss + loss_of(h, c)
    leaves = [t for t in (x, *(hx or ()), *cell.parameters()) if t.requires_grad]
    return (h, c, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B", [1, 3, 0])
@pytest.mark.parametrize("given_state", [True, False], ids=["given_state", "default_state"])
@pytest.mark.parametrize("steps", [1, 4])
def test_matches_torch_lstm_cell(device, dtype, bias, B, given_state, steps):
    fast, ref = make_cells(5, 7, dtype, device, bias)
    x = torch.randn(B, 5, dtype=dtype, device=device, requires_grad=True)
    hx = None
    if given_state:
        hx = (torch.randn(B, 7, dtype=dtype, device=device, requires_grad=True),
              torch.randn(B, 7, dtype=dtype, device=device, requires_grad=True))
    got = step_and_grads(fast, x, hx, steps)
    want = step_and_grads(ref, x, hx, steps)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("given_state", [True, False])
def test_unbatched_input(given_state):
    fast, ref = make_cells(5, 7)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)) \
        if given_state else None
    got, want = step_and_grads(fast, x, hx), step_and_grads(ref, x, hx)
    assert got[0].shape == (7,) and got[1].shape == (7,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_error(dtype):
    # Against a float64 step: our error at most 2x PyTorch's own in that dtype (and its rounding).
    fast, ref = make_cells(64, 96, torch.float64)
    x, h, c = (torch.randn(8, n, dtype=torch.float64) for n in (64, 96, 96))
    with torch.no_grad():
        exact = ref(x, (h, c))
        ours = fast.to(dtype)(x.to(dtype), (h.to(dtype), c.to(dtype)))
        theirs = ref.to(dtype)(x.to(dtype), (h.to(dtype), c.to(dtype)))
    eps = torch.finfo(dtype).eps
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == dtype
        err, torch_err = (o.double() - e).abs().max(), (t.double() - e).abs().max()
        assert err <= 2 * torch_err + eps, (err, torch_err)


def test_construction_parameters_state_dict_and_repr():
    torch.manual_seed(3)
    ref = torch.nn.LSTMCell(5, 7, bias=False)
    torch.manual_seed(3)
    fast = fastlstm.LSTMCell(5, 7, bias=False)
    assert isinstance(fast, torch.nn.RNNCellBase)
    assert repr(fast) == repr(ref)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert fast.bias_ih is None and fast.bias_hh is None
    # Same init (torch's RNNCellBase.reset_parameters, same random draws) and state_dict both ways.
    for (n, p), (_, q) in zip(fast.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    ref2 = torch.nn.LSTMCell(5, 7, bias=False)
    ref2.load_state_dict(fastlstm.LSTMCell(5, 7, bias=False).state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fast.load_state_dict(torch.nn.LSTMCell(5, 7).state_dict())


def test_constructor_errors_match_torch():
    for args in [(3, -1), (-2, 3)]:
        with pytest.raises(RuntimeError) as want:
            torch.nn.LSTMCell(*args)
        with pytest.raises(RuntimeError) as got:
            fastlstm.LSTMCell(*args)
        assert str(got.value) == str(want.value)


def _bad_calls():
    f64 = torch.float64
    return {
        "input_size": (torch.randn(2, 5), None),
        "batch_h": (torch.randn(2, 3), (torch.randn(3, 4), torch.randn(3, 4))),
        "batch_c": (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(3, 4))),
        "hidden_h": (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 4))),
        "hidden_c": (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 5))),
        "dtype_input": (torch.randn(2, 3, dtype=f64), None),
        "dtype_h": (torch.randn(2, 3), (torch.randn(2, 4, dtype=f64), torch.randn(2, 4))),
        "int_input": (torch.ones(2, 3, dtype=torch.long), None),
        "3d_input": (torch.randn(1, 2, 3), None),
        "3d_hx": (torch.randn(2, 3), (torch.randn(1, 2, 4), torch.randn(2, 4))),
        "3d_cx": (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(1, 2, 4))),
        "unbatched_input_batched_hx": (torch.randn(3), (torch.randn(2, 4), torch.randn(2, 4))),
        # hx that is not a pair of tensors
        "hx_stacked_tensor": (torch.randn(2, 3), torch.zeros(2, 2, 4)),
        "hx_2d_tensor": (torch.randn(2, 3), torch.zeros(2, 4)),
        "hx_three_tensors": (torch.randn(2, 3), (torch.zeros(2, 4),) * 3),
        "hx_one_tensor": (torch.randn(2, 3), (torch.zeros(2, 4),)),
        "hx_empty": (torch.randn(2, 3), ()),
        "hx_unbatched_one_tensor": (torch.randn(3), (torch.zeros(4),)),
        "hx_with_none": (torch.randn(2, 3), (None, torch.zeros(2, 4))),
        "hx_int": (torch.randn(2, 3), 5),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_forward_errors_match_torch(case):
    x, hx = _bad_calls()[case]
    fast, ref = make_cells(3, 4, torch.float32)
    with pytest.raises(Exception) as want:
        ref(x, hx)
    with pytest.raises(type(want.value)) as got:
        fast(x, hx)
    assert str(got.value) == str(want.value)


def test_gradcheck_and_gradgradcheck():
    fast, _ = make_cells(3, 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(fast.parameters())

    def f(x, h, c, *p):
        return torch.ops.fastlstm.lstm_cell_forward(x, h, c, *p)[:2]

    torch.autograd.gradcheck(f, (x, h, c, *params))
    torch.autograd.gradgradcheck(f, (x, h, c, *params))
    torch.autograd.gradcheck(lambda x, h, c: fast(x, (h, c)), (x, h, c))


def cell_args(bias=True, B=3, I=5, H=4, dtype=torch.float64):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return (t(B, I), t(B, H), t(B, H), t(4 * H, I), t(4 * H, H),
            t(4 * H) if bias else None, t(4 * H) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_forward(bias, dtype):
    torch.library.opcheck(torch.ops.fastlstm.lstm_cell_forward.default,
                          cell_args(bias, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_backward(dtype):
    args = [a.detach() for a in cell_args(dtype=dtype)]
    h, c, gates = torch.ops.fastlstm.lstm_cell_forward(*args)
    torch.library.opcheck(torch.ops.fastlstm.lstm_cell_backward.default,
                          (torch.randn_like(h), torch.randn_like(c), args[2], c, gates))


def test_backward_op_errors():
    args = [a.detach() for a in cell_args()]
    h, c, gates = torch.ops.fastlstm.lstm_cell_forward(*args)
    with pytest.raises(RuntimeError, match=r"gates must have shape"):
        torch.ops.fastlstm.lstm_cell_backward(h, c, args[2], c, gates[:, :-1])
    with pytest.raises(RuntimeError, match=r"gates must have dtype"):
        torch.ops.fastlstm.lstm_cell_backward(h, c, args[2], c, gates.float())
    with pytest.raises(RuntimeError, match=r"grad_h must have shape"):
        torch.ops.fastlstm.lstm_cell_backward(h[:1], c, args[2], c, gates)


def test_op_errors_name_the_argument():
    x, h, c, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in cell_args()]
    op = torch.ops.fastlstm.lstm_cell_forward
    with pytest.raises(RuntimeError, match=r"w_hh must have shape"):
        op(x, h, c, w_ih, w_hh[:, :-1], b_ih, b_hh)
    with pytest.raises(RuntimeError, match=r"b_hh must have shape"):
        op(x, h, c, w_ih, w_hh, b_ih, b_hh[:-1])
    with pytest.raises(RuntimeError, match=r"cx must have the input's dtype"):
        op(x, h, c.float(), w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(RuntimeError, match=r"input must be 2-D"):
        op(x[0], h, c, w_ih, w_hh, b_ih, b_hh)


def test_compile_fullgraph_decoder_loop():
    fast, ref = make_cells(5, 7)
    compiled = torch.compile(fast, fullgraph=True)

    def decode(cell, x, steps=3):
        state = None
        outs = []
        for _ in range(steps):
            state = cell(x, state)
            outs.append(state[0])
        return torch.stack(outs)

    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    got, want = decode(compiled, x), decode(ref, x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    g = torch.autograd.grad(got.sum(), [x, *fast.parameters()])
    w = torch.autograd.grad(want.sum(), [x, *ref.parameters()])
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_frozen_weights_and_no_grad_state():
    # Autograd asks only for what is needed; the rest must still be right.
    fast, ref = make_cells(5, 7)
    for cell in (fast, ref):
        cell.weight_ih.requires_grad_(False)
        cell.bias_hh.requires_grad_(False)
    x = torch.randn(3, 5, dtype=torch.float64)
    got = step_and_grads(fast, x, None, steps=3)
    want = step_and_grads(ref, x, None, steps=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_replace_lstm_converts_cells():
    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.LSTMCell(5, 7)
            self.inner = torch.nn.Sequential(torch.nn.LSTMCell(7, 7))

    model = Decoder().double().eval()
    weight = model.cell.weight_ih
    fastlstm.replace_lstm(model)
    assert isinstance(model.cell, fastlstm.LSTMCell)
    assert isinstance(model.inner[0], fastlstm.LSTMCell)
    assert model.cell.weight_ih is weight and not model.cell.training
    bare = fastlstm.replace_lstm(torch.nn.LSTMCell(3, 4, bias=False))
    assert isinstance(bare, fastlstm.LSTMCell) and bare.bias_ih is None
    x = torch.randn(2, 3)
    torch.testing.assert_close(bare(x)[0], torch._VF.lstm_cell(
        x, (torch.zeros(2, 4), torch.zeros(2, 4)), bare.weight_ih, bare.weight_hh, None, None)[0],
        **TOL[torch.float32])


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "jvp", "vmap_grad",
                                       "per_sample_param_grads"])
def test_torch_func_transforms_match_the_reference(transform):
    # Under forward-mode AD or a torch.func transform the cell runs in ATen ops (the C++ autograd
    # Function is refused there); the oracle is fastlstm.reference's plain-PyTorch step.
    from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

    fast, _ = make_cells(3, 4)
    params = dict(fast.named_parameters())
    x = torch.randn(2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)

    def run_fast(p, x):
        return functional_call(fast, p, (x, (h0, c0)))[0]

    def run_ref(p, x):
        return fastlstm.reference.lstm_layer(
            x.unsqueeze(0), h0, c0, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])[1]

    def apply(f):
        if transform == "grad":
            return grad(lambda x: f(params, x).sum())(x)
        if transform == "jacrev":
            return jacrev(lambda x: f(params, x))(x)
        if transform == "jacfwd":
            return jacfwd(lambda x: f(params, x))(x)
        if transform == "jvp":
            return jvp(lambda x: f(params, x), (x,), (torch.ones_like(x),))[1]
        if transform == "vmap_grad":
            return vmap(grad(lambda xi: f(params, xi.expand(2, 3)).sum()))(x)
        per_sample = vmap(grad(lambda p, xi: f(p, xi.unsqueeze(0).expand(2, 3)).sum()),
                          in_dims=(None, 0))(params, x)
        return torch.cat([g.flatten(1) for g in per_sample.values()], 1)

    got, want = apply(run_fast), apply(run_ref)
    assert want.abs().max() > 0.01
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_forward_mode_ad():
    import torch.autograd.forward_ad as fwAD

    fast, ref = make_cells(3, 4)
    x, t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    results = []
    for cell in (fast, ref):
        with fwAD.dual_level():
            h, c = cell(fwAD.make_dual(x, t))
            results.append((fwAD.unpack_dual(h).tangent, fwAD.unpack_dual(c).tangent))
    for got, want in zip(*results):
        assert want.abs().max() > 0.01
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_bias_gradients_are_distinct_tensors():
    # torch.autograd.grad gives each bias its own tensor, as torch.nn.LSTMCell does: in-place scaling
    # of the gradient list (gradient clipping) scales each once.
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(3, 4, dtype=torch.float64)
    fast = fastlstm.LSTMCell(3, 4, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    grads = list(torch.autograd.grad(fast(x)[0].sum(), list(fast.parameters())))
    expected = torch.autograd.grad(ref(x)[0].sum(), list(ref.parameters()))
    assert grads[2].data_ptr() != grads[3].data_ptr()
    torch._foreach_mul_(grads, 0.5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, 0.5 * e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["layer_op", "reference"])
def test_fallback_paths_match_torch_lstm_cell(monkeypatch, path, dtype):
    # Without a cell kernel a step runs the layer op with T = 1 (as on CUDA); without either, the
    # plain-PyTorch step of fastlstm.reference. Both give torch.nn.LSTMCell's results.
    from fastlstm import ops

    monkeypatch.setitem(ops._CELL_COMPILED, "cpu", False)
    if path == "reference":
        monkeypatch.setitem(ops._COMPILED, "cpu", False)
    target, name = (ops, "_fused_layer") if path == "layer_op" else (ops.reference, "lstm_cell")
    real, calls = getattr(target, name), []
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    for bias in (True, False):
        fast, ref = make_cells(5, 7, dtype, bias=bias)
        x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
        hx = (torch.randn(3, 7, dtype=dtype, requires_grad=True),
              torch.randn(3, 7, dtype=dtype, requires_grad=True))
        got = step_and_grads(fast, x, hx, steps=3)
        want = step_and_grads(ref, x, hx, steps=3)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[dtype])
    assert calls, f"the {path} path was not taken"


@pytest.mark.parametrize("hx", [[torch.ones(2, 4), torch.ones(2, 4)],
                                (torch.ones(4), torch.ones(4), torch.ones(4))],
                         ids=["list", "unbatched_three_tensors"])
def test_hx_forms_torch_accepts(hx):
    # A list pair runs; so does a 3-tuple with unbatched input (torch.nn.LSTMCell takes hx[0] and
    # hx[1] of it before its kernel sees the pair).
    fast, ref = make_cells(3, 4, torch.float32)
    x = torch.randn(2, 3) if isinstance(hx, list) else torch.randn(3)
    for g, w in zip(fast(x, hx), ref(x, hx)):
        torch.testing.assert_close(g, w, **TOL[torch.float32])

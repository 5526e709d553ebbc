"""The ops themselves: opcheck (schema, fake, autograd registration), gradcheck and gradgradcheck in
float64, on the one-layer op and on the module."""
import itertools

import pytest
import torch

import fastlstm

pytestmark = pytest.mark.skipif(fastlstm.backend("cpu") != "compiled",
                                reason="the compiled ops are not built")

VARIANTS = list(itertools.product([False, True], [False, True], [False, True], [False, True]))
IDS = [f"{'proj' if p else 'noproj'}-{'len' if l else 'nolen'}-{'rev' if r else 'fwd'}-"
       f"{'bias' if b else 'nobias'}" for p, l, r, b in VARIANTS]


def layer_args(proj, lengths, reverse, bias, dtype=torch.float64, T=4, B=3, I=5, H=6, P=4):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)
    Hp = P if proj else H
    return (leaf(T, B, I), leaf(B, Hp), leaf(B, H), leaf(4 * H, I), leaf(4 * H, Hp),
            leaf(4 * H) if bias else None, leaf(4 * H) if bias else None,
            leaf(P, H) if proj else None,
            torch.tensor([4, 1, 3]) if lengths else None, reverse)


@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_opcheck_forward(proj, lengths, reverse, bias):
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer_forward.default,
                          layer_args(proj, lengths, reverse, bias))


@pytest.mark.parametrize("proj,lengths,reverse", [(False, False, False), (True, True, True)])
def test_opcheck_forward_inference(proj, lengths, reverse):
    # training=False: nothing saved (empty outputs, which must not alias one another).
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in layer_args(proj, lengths, reverse, True)]
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer_forward.default, (*args, False))


@pytest.mark.parametrize("proj,lengths,reverse", [v[:3] for v in VARIANTS[::2]],
                         ids=[i.rsplit("-", 1)[0] for i in IDS[::2]])
def test_opcheck_backward(proj, lengths, reverse):
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in layer_args(proj, lengths, reverse, True)]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, rev = args
    # training=True: these inputs need no gradient, so the default (None) would save nothing.
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*args, True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer_backward.default,
                          (*grads, x, h0, c0, w_ih, w_hh, w_hr, lens, out, gates, cells, hidden,
                           rev))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_matches_real_dtypes(dtype):
    args = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in layer_args(True, True, False, True)]
    real = torch.ops.fastlstm.lstm_layer_forward(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.fastlstm.lstm_layer_forward(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
    assert real[4].dtype == (torch.float32 if dtype != torch.float32 else dtype)


@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_gradcheck_layer(proj, lengths, reverse, bias):
    args = layer_args(proj, lengths, reverse, bias)
    tensors, lens, rev = args[:8], args[8], args[9]
    assert torch.autograd.gradcheck(
        lambda *t: fastlstm.ops.lstm_layer(*t, lengths=lens, reverse=rev), tensors)


@pytest.mark.parametrize("proj,lengths,reverse", [(False, False, False), (True, True, True)])
def test_gradgradcheck_layer(proj, lengths, reverse):
    args = layer_args(proj, lengths, reverse, True, T=3, B=2, I=2, H=3, P=2)
    tensors = args[:8]
    lens = torch.tensor([3, 1]) if lengths else None
    assert torch.autograd.gradgradcheck(
        lambda *t: fastlstm.ops.lstm_layer(*t, lengths=lens, reverse=args[9]), tensors)


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True),
                                    dict(proj_size=2, batch_first=True),
                                    dict(bias=False)])
def test_gradcheck_module(kwargs):
    m = fastlstm.LSTM(3, 4, dtype=torch.float64, **kwargs)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    x = torch.randn(*((2, 3) if m.batch_first else (3, 2)), 3, dtype=torch.float64,
                    requires_grad=True)
    h0 = torch.randn(m.num_layers * D, 2, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(m.num_layers * D, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, h0, c0, *params):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    params = [p.detach().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_backward_op_checks_shapes():
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in layer_args(False, False, False, True)]
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*args)
    x, h0, c0, w_ih, w_hh = args[:5]
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.fastlstm.lstm_layer_backward(out[:-1], h_n, c_n, x, h0, c0, w_ih, w_hh, None,
                                               None, out, gates, cells, hidden, False)


@pytest.mark.parametrize("bad,match", [
    (lambda a: a.__setitem__(1, a[1][:, :-1]), "h0 must have shape"),
    (lambda a: a.__setitem__(2, a[2].float()), "c0 must have the input's dtype"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "w_hh must have shape"),
    (lambda a: a.__setitem__(5, a[5][:-1]), "bias must have shape"),
    (lambda a: a.__setitem__(8, torch.tensor([1, 2])), "lengths must have shape"),
    (lambda a: a.__setitem__(8, torch.tensor([1, 2, 9])), r"lengths must lie in \[0, T\]"),
    (lambda a: a.__setitem__(8, torch.tensor([1., 2., 3.])), "lengths must be int64"),
    (lambda a: a.__setitem__(0, a[0][0]), "input must be 3-D"),
])
def test_forward_op_checks(bad, match):
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in layer_args(False, True, False, True)]
    bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastlstm.lstm_layer_forward(*args)


FORWARD_NAMES = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths"]


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_op_rejects_one_argument_on_another_device(name):
    # One argument on meta sends the call to the fake kernel, which must check devices as the real
    # kernel does rather than return uninitialised tensors.
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in layer_args(True, True, False, True)]
    i = FORWARD_NAMES.index(name)
    args[i] = args[i].to("meta")
    with pytest.raises(RuntimeError, match="must be on the input's device|is on meta"):
        torch.ops.fastlstm.lstm_layer_forward(*args)


BACKWARD_NAMES = ["grad_output", "grad_h_n", "grad_c_n", "input", "h0", "c0", "w_ih", "w_hh",
                  "w_hr", "lengths", "output", "gates", "cells", "hidden"]


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_backward_op_rejects_one_argument_on_another_device(name):
    fwd = [a.detach() if isinstance(a, torch.Tensor) else a
           for a in layer_args(True, True, False, True)]
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*fwd, True)
    x, h0, c0, w_ih, w_hh, _, _, w_hr, lengths, reverse = fwd
    args = [torch.ones_like(out), torch.ones_like(h_n), torch.ones_like(c_n), x, h0, c0, w_ih, w_hh,
            w_hr, lengths, out, gates, cells, hidden]
    i = BACKWARD_NAMES.index(name)
    args[i] = args[i].to("meta")
    with pytest.raises(RuntimeError, match="must be on the input's device|is on meta"):
        torch.ops.fastlstm.lstm_layer_backward(*args, reverse)


# Sizes torch.nn.LSTM cannot be built with but the op accepts: hidden size 0 (with and without a
# projection), projection size 0, input size 0 (with enough rows for the blocked input projection).
DEGENERATE = {"H=0": dict(T=3, B=2, I=4, H=0, P=None), "H=0,P=3": dict(T=3, B=2, I=4, H=0, P=3),
              "P=0,B=3": dict(T=3, B=3, I=4, H=5, P=0), "P=0,B=1": dict(T=3, B=1, I=4, H=5, P=0),
              "I=0": dict(T=2, B=1100, I=0, H=3, P=None)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_sizes_match_the_reference(case, lengths, dtype):
    T, B, I, H, P = DEGENERATE[case].values()
    g = torch.Generator().manual_seed(0)
    Hp = H if P is None else P

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    tensors = [r(T, B, I), r(B, Hp), r(B, H), r(4 * H, I), r(4 * H, Hp), r(4 * H), r(4 * H),
               None if P is None else r(P, H)]
    lens = torch.randint(0, T + 1, (B,), generator=g) if lengths else None
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    got = fastlstm.ops.lstm_layer(*leaves, lengths=lens)
    ref_leaves = [None if t is None else t.to(dtype).double().requires_grad_() for t in tensors]
    ref = fastlstm.reference.lstm_layer(*ref_leaves, lengths=lens)
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5),
           torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}[dtype]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, **tol)
    weights = [r(*t.shape) for t in ref]
    sum(((a.double() * w).sum() for a, w in zip(got, weights))).backward()
    sum(((a * w).sum() for a, w in zip(ref, weights))).backward()
    for a, b in zip(leaves, ref_leaves):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), b.grad, **tol)

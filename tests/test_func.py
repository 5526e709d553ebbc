"""Gradients as users take them: torch.autograd.grad's bias gradients, in-place edits of a bias
between forward and backward, and the torch.func transforms (grad, vjp, jacrev, vmap(grad), jvp,
jacfwd, vmap), all in float64 against torch.nn.LSTM, finite differences or a per-sample loop."""
import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import fastlstm

pytestmark = pytest.mark.skipif(fastlstm.backend("cpu") != "compiled",
                                reason="the compiled ops are not built")

F64 = dict(rtol=1e-9, atol=1e-10)
CONFIGS = [dict(), dict(bidirectional=True, num_layers=2), dict(proj_size=2, bias=False)]
CONFIG_IDS = ["plain", "bidir-2layers", "proj-nobias"]


def pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    fast = fastlstm.LSTM(3, 4, dtype=torch.float64, **kwargs)
    ref = torch.nn.LSTM(3, 4, dtype=torch.float64, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def params_of(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def flat(tree):
    if isinstance(tree, dict):
        return torch.cat([v.flatten() for v in tree.values()])
    if isinstance(tree, (tuple, list)):
        return torch.cat([flat(t) for t in tree])
    return tree.flatten()


# --- torch.autograd.grad and in-place edits (issue 10, items 4 and 11) ---------------------------

def test_bias_gradients_are_distinct_tensors():
    fast, ref = pair()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = list(torch.autograd.grad(fast(x)[0].sum(), list(fast.parameters())))
    expected = torch.autograd.grad(ref(x)[0].sum(), list(ref.parameters()))
    names = [n for n, _ in fast.named_parameters()]
    b_ih, b_hh = grads[names.index("bias_ih_l0")], grads[names.index("bias_hh_l0")]
    assert b_ih.data_ptr() != b_hh.data_ptr()
    # In-place scaling of a gradient list (as gradient clipping does) scales each gradient once.
    torch._foreach_mul_(grads, 0.5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, 0.5 * e, **F64)


@pytest.mark.parametrize("bias_name", ["bias_ih_l0", "bias_hh_l0"])
def test_bias_modified_in_place_between_forward_and_backward(bias_name):
    # torch.nn.LSTM's float64 path allows it (the backward does not read the bias); so must we.
    fast, ref = pair()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (fast, ref):
        out, (h, c) = m(x)
        with torch.no_grad():
            getattr(m, bias_name).add_(1.0)
        grads.append(torch.autograd.grad((out ** 2).sum() + h.sum(), [x, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **F64)


def test_double_backward_refuses_a_bias_modified_in_place():
    # Double backward recomputes the layer from its inputs, so a changed bias would give a wrong
    # answer: it must raise instead.
    fast, _ = pair()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = fast(x)
    with torch.no_grad():
        fast.bias_hh_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), [x], create_graph=True)


# --- torch.func -----------------------------------------------------------------------------------

def loss_fn(module):
    return lambda p, x: (functional_call(module, p, (x,))[0] ** 2).sum()


def output_fn(module, params):
    return lambda x: functional_call(module, params, (x,))[0]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_func_grad_matches_torch(kwargs):
    fast, ref = pair(**kwargs)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = grad(loss_fn(fast), argnums=(0, 1))(params_of(fast), x)
    expected = grad(loss_fn(ref), argnums=(0, 1))(params_of(ref), x)
    torch.testing.assert_close(flat(got), flat(expected), **F64)
    assert flat(got).abs().max() > 0.01


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_func_vjp_and_jacrev_match_torch(kwargs):
    fast, ref = pair(**kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out_f, vjp_f = vjp(output_fn(fast, params_of(fast)), x)
    out_r, vjp_r = vjp(output_fn(ref, params_of(ref)), x)
    v = torch.randn_like(out_r)
    torch.testing.assert_close(out_f, out_r, **F64)
    torch.testing.assert_close(vjp_f(v)[0], vjp_r(v)[0], **F64)
    jac = jacrev(output_fn(fast, params_of(fast)))(x)
    torch.testing.assert_close(jac, jacrev(output_fn(ref, params_of(ref)))(x), **F64)
    assert jac.abs().max() > 0.01


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_func_jvp_and_jacfwd_match_torch_and_finite_differences(kwargs):
    # These returned all-zero tangents before forward-mode AD was handled.
    fast, ref = pair(**kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    f = output_fn(fast, params_of(fast))
    out, tangent = jvp(f, (x,), (v,))
    eps = 1e-6
    finite = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, finite, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tangent, jvp(output_fn(ref, params_of(ref)), (x,), (v,))[1], **F64)
    assert tangent.abs().max() > 0.01
    jac = jacfwd(f)(x)
    torch.testing.assert_close(jac, jacfwd(output_fn(ref, params_of(ref)))(x), **F64)
    assert jac.abs().max() > 0.01


def test_forward_ad_on_the_op_matches_finite_differences():
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    args = [torch.randn(*s, dtype=torch.float64) for s in ((4, 2, 3), (2, 5), (2, 5), (20, 3),
                                                          (20, 5), (20,), (20,))]
    tangents = [torch.randn_like(a) for a in args]
    lengths = torch.tensor([4, 2])
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        outs = torch.ops.fastlstm.lstm_layer_forward(*duals, None, lengths, True)
        got = [fwAD.unpack_dual(o).tangent for o in outs[:3]]
    eps = 1e-6

    def f(sign):
        shifted = [a + sign * eps * t for a, t in zip(args, tangents)]
        return torch.ops.fastlstm.lstm_layer_forward(*shifted, None, lengths, True)[:3]
    for g, plus, minus in zip(got, f(1), f(-1)):
        torch.testing.assert_close(g, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_func_per_sample_gradients_match_a_loop():
    # vmap(grad): one gradient per sample, checked against torch.nn.LSTM sample by sample.
    fast, ref = pair(num_layers=2)
    xs = torch.randn(3, 5, 3, dtype=torch.float64)  # 3 samples, each [T=5, I=3] (unbatched)
    got = vmap(grad(loss_fn(fast)), in_dims=(None, 0))(params_of(fast), xs.unsqueeze(2))
    for k in range(xs.shape[0]):
        expected = torch.autograd.grad((ref(xs[k].unsqueeze(1))[0] ** 2).sum(),
                                       list(ref.parameters()))
        torch.testing.assert_close(torch.cat([g[k].flatten() for g in got.values()]),
                                   flat(list(expected)), **F64)


def test_func_grad_of_grad_matches_torch():
    fast, ref = pair()
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def gnorm(module):
        return lambda x: grad(lambda x: (functional_call(module, params_of(module), (x,))[0] ** 2)
                              .sum())(x).pow(2).sum()
    torch.testing.assert_close(grad(gnorm(fast))(x), grad(gnorm(ref))(x), **F64)


def _op_calls(fn, *args):
    with torch.profiler.profile() as prof:
        result = fn(*args)
    return result, sum(e.count for e in prof.key_averages()
                       if e.key == "fastlstm::lstm_layer_forward")


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_vmap_folds_into_the_batch(kwargs):
    fast, _ = pair(**kwargs)
    xs = torch.randn(6, 5, 2, 3, dtype=torch.float64)  # 6 vmapped batches of [T, B, I]
    with torch.no_grad():
        (out, (h, c)), calls = _op_calls(vmap(fast), xs)
        for k in range(xs.shape[0]):
            o, (hk, ck) = fast(xs[k])
            torch.testing.assert_close(out[k], o, **F64)
            torch.testing.assert_close(h[k], hk, **F64)
            torch.testing.assert_close(c[k], ck, **F64)
    # One call per layer and direction for all 6 (plus the batched call each one is dispatched
    # through), where vmap's per-sample fallback would make 6 + 1.
    layers = fast.num_layers * (2 if fast.bidirectional else 1)
    assert calls == 2 * layers


def test_vmap_with_lengths_states_and_ensembled_weights():
    torch.manual_seed(0)
    N, T, B, I, H = 3, 5, 2, 3, 4
    x = torch.randn(N, T, B, I, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    c0 = torch.randn(N, B, H, dtype=torch.float64)
    w_ih = torch.randn(N, 4 * H, I, dtype=torch.float64)
    w_hh = torch.randn(4 * H, H, dtype=torch.float64)
    lengths = torch.tensor([[5, 2], [3, 5], [1, 4]])
    layer = fastlstm.ops.lstm_layer
    shared = vmap(lambda x, c0, n: layer(x, h0, c0, w_ih[0], w_hh, lengths=n, reverse=True))(
        x, c0, lengths)
    ensemble = vmap(lambda x, w: layer(x, h0, c0[0], w, w_hh))(x, w_ih)
    for k in range(N):
        for got, expected in zip(shared, layer(x[k], h0, c0[k], w_ih[0], w_hh, lengths=lengths[k],
                                               reverse=True)):
            torch.testing.assert_close(got[k], expected, **F64)
        for got, expected in zip(ensemble, layer(x[k], h0, c0[0], w_ih[k], w_hh)):
            torch.testing.assert_close(got[k], expected, **F64)


def test_vmap_in_grad_mode_then_backward_matches_a_loop():
    fast, _ = pair(num_layers=2, bidirectional=True)
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    out = vmap(fast)(xs)[0]
    got = torch.autograd.grad((out ** 2).sum(), list(fast.parameters()))
    loop = torch.stack([fast(x)[0] for x in xs])
    torch.testing.assert_close(out, loop, **F64)
    expected = torch.autograd.grad((loop ** 2).sum(), list(fast.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **F64)

"""The variant layer op (fastlstm::lstm_variant_forward / backward, CPU) against its plain-PyTorch
definition, fastlstm.reference.lstm_variant_layer, with the same masks: outputs, states and every
gradient, in float64 (and float32/bfloat16 within stated bounds), for each variant and their
combinations with projection, lengths and direction. The module-level tests are in
tests/test_variants.py."""
from __future__ import annotations

import itertools

import pytest
import torch

import fastlstm
from fastlstm import ops, reference

pytestmark = pytest.mark.skipif(not ops._VARIANT_COMPILED.get("cpu", False),
                                reason="the compiled CPU ops are not built")

VARIANTS = ["zoneout_mask", "zoneout_eval", "clip", "layer_norm"]
COMBOS = [c for r in range(1, 5) for c in itertools.combinations(VARIANTS, r)
          if not {"zoneout_mask", "zoneout_eval"} <= set(c)]


def make_case(combo, T=5, B=4, I=3, H=6, P=None, dtype=torch.float64, lengths=None, seed=0,
              bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.5):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)

    Pp = P or H
    args = dict(input=rnd(T, B, I, scale=1.5), h0=rnd(B, Pp), c0=rnd(B, H, scale=1.5),
                w_ih=rnd(4 * H, I), w_hh=rnd(4 * H, Pp), b_ih=rnd(4 * H) if bias else None,
                b_hh=rnd(4 * H) if bias else None, w_hr=rnd(Pp, H) if P else None)
    acc = ops.cell_dtype(dtype)
    kw = {}
    if "zoneout_mask" in combo:
        kw["zoneout_c"] = torch.bernoulli(torch.full((T, B, H), 0.3, dtype=torch.float64),
                                          generator=g).to(acc)
        kw["zoneout_h"] = torch.bernoulli(torch.full((T, B, Pp), 0.4, dtype=torch.float64),
                                          generator=g).to(acc)
    if "zoneout_eval" in combo:
        kw["zoneout_c"], kw["zoneout_h"] = 0.25, 0.1
    if "clip" in combo:
        kw["cell_clip"] = 0.4  # small enough that some of c~ clips
    if "layer_norm" in combo:
        kw["layer_norm"] = (1 + rnd(4 * H, scale=0.3), 1 + rnd(4 * H, scale=0.3), 1 + rnd(H, scale=0.3),
                            rnd(H, scale=0.3))
    if lengths is not None:
        args["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    return args, kw


def run(fn, args, kw, reverse, grads=True):
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    ln = None
    if kw.get("layer_norm") is not None:
        ln = tuple(p.detach().clone().requires_grad_(grads) for p in kw["layer_norm"])
    call = {**args, **leaves}
    out = fn(**call, reverse=reverse, **{**kw, **({"layer_norm": ln} if ln else {})})
    if not grads:
        return out, None
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    params = list(leaves.values()) + list(ln or ())
    names = list(leaves) + ["ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias"][:len(ln or ())]
    gs = torch.autograd.grad(loss, params)
    return out, dict(zip(names, gs))


@pytest.mark.parametrize("combo", COMBOS, ids=["+".join(c) for c in COMBOS])
@pytest.mark.parametrize("layout", ["plain", "proj", "lengths", "reverse_lengths_proj"])
def test_float64_matches_reference(combo, layout):
    P = 4 if "proj" in layout else None
    lengths = [5, 3, 0, 4] if "lengths" in layout else None
    reverse = "reverse" in layout
    args, kw = make_case(combo, P=P, lengths=lengths)
    out, g = run(ops.lstm_variant_layer, args, kw, reverse)
    ref_out, ref_g = run(reference.lstm_variant_layer, args, kw, reverse)
    for name, a, b in zip(("output", "h_n", "c_n"), out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert set(g) == set(ref_g)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_clip_really_clips():
    # The case above must exercise the clamp (else the clip tests prove nothing).
    args, kw = make_case(("clip",))
    _, _, c_n = reference.lstm_variant_layer(**args, **kw)
    _, _, c_free = reference.lstm_variant_layer(**args)
    assert (c_n.abs() == 0.4).any() and (c_free.abs() > 0.4).any()


@pytest.mark.parametrize("combo", [("zoneout_mask", "clip", "layer_norm"), ("zoneout_eval",)],
                         ids=["zoneout+clip+ln", "zoneout_eval"])
def test_gradcheck_and_gradgradcheck(combo):
    args, kw = make_case(combo, T=3, B=2, I=2, H=3, P=2, lengths=[3, 2])
    names = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    ln = kw.pop("layer_norm", None)
    leaves = [args[n].detach().clone().requires_grad_() for n in names]
    ln_leaves = [p.detach().clone().requires_grad_() for p in ln] if ln else []

    def f(*xs):
        t = dict(zip(names, xs[:8]))
        return ops.lstm_variant_layer(**t, lengths=args["lengths"], reverse=True, **kw,
                                      layer_norm=tuple(xs[8:]) if ln else None)

    torch.autograd.gradcheck(f, leaves + ln_leaves)
    torch.autograd.gradgradcheck(f, leaves + ln_leaves)


def test_no_grad_saves_nothing_and_matches():
    args, kw = make_case(("zoneout_eval", "layer_norm", "clip"))
    with torch.no_grad():
        out = ops.lstm_variant_layer(**args, **kw)
    ref = reference.lstm_variant_layer(**args, **kw)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype):
    # 16-bit input computes in float32 and rounds h each step; float32 computes in float32. Bound:
    # a small multiple of the dtype's error of the reference computed in that dtype (torch's own).
    combo = ("zoneout_mask", "clip", "layer_norm")
    args, kw = make_case(combo, T=8, B=3, I=5, H=16, dtype=dtype)
    out, g = run(ops.lstm_variant_layer, args, kw, False)
    a64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    kw64 = {k: (tuple(p.double() for p in v) if isinstance(v, tuple) else
                v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref, ref_g = run(reference.lstm_variant_layer, a64, kw64, False)
    low, low_g = run(reference.lstm_variant_layer, args, kw, False)
    for a, r, l in zip(out, ref, low):
        err = (a.double() - r).abs().max().item()
        torch_err = (l.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 10 * torch.finfo(dtype).eps, (err, torch_err)
    for name in g:
        err = (g[name].double() - ref_g[name]).abs().max().item()
        torch_err = (low_g[name].double() - ref_g[name]).abs().max().item()
        scale = ref_g[name].abs().max().item()
        assert err <= 2 * torch_err + 10 * torch.finfo(dtype).eps * scale, (name, err, torch_err)


def test_bad_arguments_raise():
    args, kw = make_case(("zoneout_mask",))
    bad = dict(kw, zoneout_c=kw["zoneout_c"][:, :, :2])
    with pytest.raises(RuntimeError, match="zoneout_c"):
        ops.lstm_variant_layer(**args, **bad)
    with pytest.raises(RuntimeError, match="cell_clip"):
        ops.lstm_variant_layer(**args, cell_clip=-1.0)
    ln = make_case(("layer_norm",))[1]["layer_norm"]
    with pytest.raises(RuntimeError, match="ln_c_bias"):
        ops.lstm_variant_layer(**args, layer_norm=(*ln[:3], ln[3][:2]))


@pytest.mark.parametrize("combo", [("zoneout_mask", "clip", "layer_norm"), ("zoneout_eval", "clip")],
                         ids=["zoneout+clip+ln", "zoneout_eval+clip"])
@pytest.mark.parametrize("lengths", [None, [9, 9, 7, 7, 5, 3, 3, 1, 0], [2, 9, 0, 5, 9, 1, 7, 3, 4]],
                         ids=["full", "sorted", "unsorted"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batch_split_across_threads(combo, lengths, threads):
    # With at least 4 rows a thread, each thread runs its share of the batch through all steps;
    # below that the rows of each step are shared out. Both against the reference, with a
    # projection, in both directions.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reverse in (False, True):
            args, kw = make_case(combo, T=9, B=9, I=5, H=8, P=6, lengths=lengths)
            out, g = run(ops.lstm_variant_layer, args, kw, reverse)
            ref_out, ref_g = run(reference.lstm_variant_layer, args, kw, reverse)
            for a, b in zip(out, ref_out):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for name in g:
                torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-11)
    finally:
        torch.set_num_threads(previous)


def test_nan_in_padding_does_not_reach_gradients():
    # Steps past a sequence's length are never read: NaN there changes nothing (as in the plain op).
    combo = ("zoneout_mask", "clip", "layer_norm")
    args, kw = make_case(combo, lengths=[5, 2, 0, 3])
    clean_out, clean_g = run(ops.lstm_variant_layer, args, kw, False)
    lengths = args["lengths"]
    pad = torch.arange(5).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    dirty = dict(args, input=args["input"].masked_fill(pad.unsqueeze(2), float("nan")))
    out, g = run(ops.lstm_variant_layer, dirty, kw, False)
    for a, b in zip(out, clean_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in g:
        if name == "input":
            torch.testing.assert_close(g[name][~pad], clean_g[name][~pad], rtol=0, atol=0)
        else:
            torch.testing.assert_close(g[name], clean_g[name], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,H", [(torch.float64, 128), (torch.float32, 256)])
def test_padded_gradient_rows(dtype, H):
    # Where 4H values fill a multiple of 4 KiB the backward pads its gradient rows (float64 H=128,
    # float32 H=256); with T * B >= 64 float32 takes the brgemm weight-gradient path.
    combo = ("zoneout_mask", "clip", "layer_norm")
    args, kw = make_case(combo, T=8, B=9, I=7, H=H, P=None, dtype=dtype, lengths=[8, 8, 7, 5, 5, 3, 2, 1, 0])
    out, g = run(ops.lstm_variant_layer, args, kw, False)
    a64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in args.items()}
    kw64 = {k: (tuple(p.double() for p in v) if isinstance(v, tuple) else
                v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref, ref_g = run(reference.lstm_variant_layer, a64, kw64, False)
    if dtype == torch.float64:
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for name in g:
            torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-11)
        return
    # float32: within twice the error of the same variant in plain PyTorch float32 (plus a few ulp).
    low, low_g = run(reference.lstm_variant_layer, args, kw, False)
    pairs = [(a, r, l) for a, r, l in zip(out, ref, low)] + [(g[n], ref_g[n], low_g[n]) for n in g]
    for a, r, l in pairs:
        err = (a.double() - r).abs().max().item()
        torch_err = (l.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 10 * torch.finfo(dtype).eps * r.abs().max().item(), (err, torch_err)

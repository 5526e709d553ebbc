"""The variant layer's CUDA code (issue 29: csrc/kernels/lstm_variant.cu and the layer code in
lstm_variant_host.h) compiled as host C++ and run on the CPU by the emulator in tests/emu, against
fastlstm/reference.py's lstm_variant_step in float64.

Every flag combination (layer norm, cell clipping, zoneout off / expectation / masks / a mask for c
and the expectation for h, projection) runs in every dtype, with and without lengths, in both
directions:
- forward, step by step: each step's output and saved row (csrc/fastlstm.cpp's layout) against the
  float64 reference step fed with the kernels' own carried state and the input projection rounded
  where the layer code rounds it (so 16-bit types are held to their rounding, not to an error that
  grows over steps); steps past a sequence's length output 0, save zero rows and leave the state
  alone; inference gives bitwise the training forward's results; float64 also end to end against
  reference.lstm_variant_layer;
- backward, on the emulated forward's saved rows: the gradient of every input and parameter, and the
  per-step gradients of the pre-activations and of x_t W_ih^T, against torch.autograd through the
  reference steps (float64 tight, float32 to float32 rounding; 16-bit types within a small multiple
  of torch's own error when the reference runs in that dtype); for float32 and 16-bit types also the
  gradients the backward keeps in the cell type (per-step pre-activations, grad_c0; grad_h0 rounded
  once) against the autograd of the forward the kernels ran (float64, fed with their rounded h_t), to
  the cell type's precision, so that a backward that carries dc or dh in 16 bits fails.
Odd shapes (one sequence and unit, H over the block's 128 threads, P > H) run every loop edge; the
results do not depend on the order in which threads and blocks run (bitwise); a few cases run under
AddressSanitizer. What the emulator cannot show is in docs/cuda.md."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlstm
from fastlstm import reference

sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
import emulator  # noqa: E402
import rounding  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulator.CXX) is None,
                                reason=f"no C++ compiler ({emulator.CXX}) to build the emulator")

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CELL = {torch.float64: F64, torch.float32: torch.float32, torch.float16: torch.float32,
        torch.bfloat16: torch.float32}
EPS = reference.LAYER_NORM_EPS
# zoneout: (c, h), each None (off), a float (the expectation) or "mask" (Bernoulli(0.3) masks).
ZONEOUT = {"nozone": (None, None), "eval": (0.3, 0.15), "masks": ("mask", "mask"),
           "cmask": ("mask", 0.25)}
CLIP = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def sm80():
    return emulator.build("sm80")


def _id(v):
    return str(v).replace("torch.", "")


class VCase:
    """One variant layer's inputs in float64, rounded through `dtype` (masks are 0/1)."""

    def __init__(self, dtype, layer_norm, clip, zone, proj, lengths, reverse, dims=(4, 5, 7, 20, 13),
                 seed=0, bias=True):
        T, B, I, H, P = dims
        P = P if proj else H
        self.dtype, self.cell = dtype, CELL[dtype]
        self.T, self.B, self.I, self.H, self.P, self.proj = T, B, I, H, P, proj
        self.layer_norm, self.reverse = layer_norm, reverse
        self.clip = CLIP if clip else None
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0, shift=0.0):
            t = (torch.rand(*shape, generator=g, dtype=F64) * 2 - 1) * scale + shift
            return t.to(dtype).to(F64)

        k = 2.0 / H ** 0.5
        self.x, self.h0, self.c0 = r(T, B, I, scale=2.0), r(B, P), r(B, H, scale=1.5)
        self.w_ih, self.w_hh = r(4 * H, I, scale=k), r(4 * H, P, scale=k)
        b_ih, b_hh = r(4 * H, scale=k), r(4 * H, scale=k)
        # The layer code takes b_ih + b_hh, summed in the input dtype (as the binding does).
        # Without a bias the kernels get none and the reference adds zeros (exactly the same).
        self.bias = (b_ih.to(dtype) + b_hh.to(dtype)).to(F64) if bias else torch.zeros(4 * H, dtype=F64)
        self.has_bias = bias
        self.w_hr = r(P, H, scale=k) if proj else None
        self.ln = (r(4 * H, scale=0.3, shift=1.0), r(4 * H, scale=0.3, shift=1.0),
                   r(H, scale=0.3, shift=1.0), r(H, scale=0.2)) if layer_norm else None
        zc, zh = ZONEOUT[zone]
        mask = lambda *s: (torch.rand(*s, generator=g) < 0.3).to(F64)  # noqa: E731
        self.zc = mask(T, B, H) if zc == "mask" else zc
        self.zh = mask(T, B, P) if zh == "mask" else zh
        self.lengths = None
        if lengths:
            # Strictly inside (0, T) except the first (nothing to run) and the last (all of it).
            ln = torch.randint(1, max(T, 2), (B,), generator=g)
            ln[0], ln[-1] = 0, T
            self.lengths = ln
        g2 = torch.Generator().manual_seed(seed + 1)
        self.go, self.ghn, self.gcn = (torch.randn(*s, generator=g2, dtype=F64).to(dtype).to(F64)
                                       for s in [(T, B, P), (B, P), (B, H)])

    def order(self):
        return list(range(self.T - 1, -1, -1)) if self.reverse else list(range(self.T))

    def active(self, t):
        if self.lengths is None:
            return torch.ones(self.B, dtype=torch.bool)
        return self.lengths > t

    def zone_at(self, z, t):
        return z[t] if isinstance(z, torch.Tensor) else z

    def K(self):
        return 16 * self.H + 3 if self.layer_norm else 7 * self.H

    # ---- the emulator ----
    def tensors(self, training, max_xg=0):
        dt, cell = self.dtype, self.cell
        zc_p = self.zc if isinstance(self.zc, float) else 0.0
        zh_p = self.zh if isinstance(self.zh, float) else 0.0
        t = {"sizes": torch.tensor([self.T, self.B, self.I, self.H, self.P]),
             "flags": torch.tensor([int(self.reverse), int(training), emulator.DTYPE_CODE[dt], max_xg]),
             "variant": torch.tensor([zc_p, zh_p, float(self.clip is not None), self.clip or 0.0],
                                     dtype=F64),
             "x": self.x.to(dt), "h0": self.h0.to(dt), "c0": self.c0.to(dt), "w_ih": self.w_ih.to(dt),
             "w_hh": self.w_hh.to(dt), "bias": self.bias.to(dt) if self.has_bias else None,
             "w_hr": None if self.w_hr is None else self.w_hr.to(dt), "lengths": self.lengths,
             "zoneout_c": self.zc.to(cell) if isinstance(self.zc, torch.Tensor) else None,
             "zoneout_h": self.zh.to(cell) if isinstance(self.zh, torch.Tensor) else None}
        if self.ln is not None:
            for name, v in zip(["ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias"], self.ln):
                t[name] = v.to(dt)
        return t

    def emu_forward(self, exe, training=True, env=None, max_xg=0):
        T, B, H, P, dt = self.T, self.B, self.H, self.P, self.dtype
        shapes = {"output": ((T, B, P), dt), "h_n": ((B, P), dt), "c_n_acc": ((B, H), self.cell),
                  "saved": (((T if training else 1), B, self.K()), self.cell),
                  "buffers": ((10,), torch.int64)}
        return emulator.run(exe, "variant_forward", self.tensors(training, max_xg), shapes, env)

    def emu_backward(self, exe, fwd, env=None):
        T, B, I, H, P, dt = self.T, self.B, self.I, self.H, self.P, self.dtype
        t = dict(self.tensors(True), grad_output=self.go.to(dt), grad_h_n=self.ghn.to(dt),
                 grad_c_n=self.gcn.to(dt), output=fwd["output"], saved=fwd["saved"])
        shapes = {"grad_input": ((T, B, I), dt), "grad_h0": ((B, P), dt),
                  "grad_c0_acc": ((B, H), self.cell), "grad_w_ih": ((4 * H, I), dt),
                  "grad_w_hh": ((4 * H, P), dt), "grad_bias": ((4 * H,), dt),
                  "dpre": ((T, B, 4 * H), self.cell), "dxg": ((T, B, 4 * H), self.cell)}
        if self.proj:
            shapes["grad_w_hr"] = ((P, H), dt)
        if self.layer_norm:
            shapes.update(grad_ln_ih=((4 * H,), dt), grad_ln_hh=((4 * H,), dt),
                          grad_ln_c_weight=((H,), dt), grad_ln_c_bias=((H,), dt))
        return emulator.run(exe, "variant_backward", t, shapes, env)


def saved_row(xg, h, c, w_hh, bias, w_hr, zc, zh, clip, ln):
    """csrc/fastlstm.cpp's saved row of one step (float64), from reference.lstm_variant_step's
    formulas; checked against that function's (h, c) here."""
    rec = F.linear(h, w_hh)
    H = c.shape[1]

    def norm(v):
        var = v.var(dim=1, unbiased=False, keepdim=True)
        rstd = 1 / torch.sqrt(var + EPS)
        return (v - v.mean(dim=1, keepdim=True)) * rstd, rstd

    extra = []
    if ln is not None:
        xh, rx = norm(xg)
        rh, rr = norm(rec)
        pre = xh * ln[0] + rh * ln[1]
    else:
        pre = xg + rec
    pre = pre + bias
    i, f, o = (torch.sigmoid(p) for p in (pre[:, :H], pre[:, H:2 * H], pre[:, 3 * H:]))
    g = torch.tanh(pre[:, 2 * H:3 * H])
    c_raw = f * c + i * g
    cc = c_raw if clip is None else torch.clamp(c_raw, -clip, clip)
    if ln is not None:
        ch, rc = norm(cc)
        y = torch.tanh(ch * ln[2] + ln[3])
        extra = [xh, rh, ch, rx, rr, rc]
    else:
        y = torch.tanh(cc)
    c_t = cc if zc is None else zc * c + (1 - zc) * cc
    h_t = o * y
    if w_hr is not None:
        h_t = F.linear(h_t, w_hr)
    h_t = h_t if zh is None else zh * h + (1 - zh) * h_t
    ref_h, ref_c = reference.lstm_variant_step(xg, h, c, w_hh, bias, w_hr, zc, zh, clip, ln)
    torch.testing.assert_close(h_t, ref_h, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(c_t, ref_c, rtol=1e-13, atol=1e-13)
    return torch.cat([i, f, g, o, c_t, c_raw, y] + extra, dim=1), ref_h


def acc_tol(case, ref):
    """The error allowed on a value computed in the cell type: a few hundred of its roundoff
    (layer-norm sums over 4H terms, sigmoid/tanh, the float32 GEMMs) at the row's scale."""
    u = rounding.unit_roundoff(case.cell)
    return 256 * u * max(1.0, ref.abs().max().item())


def check_forward_steps(case, fwd):
    """Step by step against the float64 reference fed with the emulated carried state."""
    dt, H = case.dtype, case.H
    out, saved = fwd["output"].double(), fwd["saved"].double()
    order = case.order()
    h_n, c_n = case.h0.clone(), case.c0.clone()
    for k, t in enumerate(order):
        act = case.active(t)
        if k == 0:
            h, c = case.h0, case.c0
        else:
            pt = order[k - 1]
            pa = case.active(pt).unsqueeze(1)
            h = torch.where(pa, out[pt], case.h0)
            c = torch.where(pa, saved[pt][:, 4 * H:5 * H], case.c0)
        xg = F.linear(case.x[t], case.w_ih)
        zc = case.zone_at(case.zc, t)
        zh = case.zone_at(case.zh, t)
        row, h_ref = saved_row(xg, h, c, case.w_hh, case.bias, case.w_hr, zc, zh, case.clip, case.ln)
        a = act
        assert torch.all(out[t][~a] == 0), f"step {t}: output of an inactive sequence is not 0"
        assert torch.all(saved[t][~a] == 0), f"step {t}: saved row of an inactive sequence is not 0"
        if a.any():
            tol = acc_tol(case, row[a])
            err = (saved[t][a] - row[a]).abs().max().item()
            assert err <= tol, f"step {t}: saved row off by {err:.3g} (allowed {tol:.3g})"
            # h_t is rounded to the input dtype once: within half an ulp of a value near the
            # reference's.
            e_h = (out[t][a] - h_ref[a]).abs()
            allowed = rounding.half_ulp(h_ref[a], dt) * (dt != F64) + acc_tol(case, h_ref[a])
            bad = e_h > allowed
            assert not bad.any(), (f"step {t}: output off by {e_h.max().item():.3g}, "
                                   f"allowed {allowed[bad].min().item():.3g}")
        h_n = torch.where(a.unsqueeze(1), out[t], h_n)
        c_n = torch.where(a.unsqueeze(1), saved[t][:, 4 * H:5 * H], c_n)
    assert torch.equal(fwd["h_n"].double(), h_n), "h_n is not the last carried h"
    assert torch.equal(fwd["c_n_acc"].double(), c_n), "c_n is not the last carried c"


def check_forward_layer_f64(case, fwd):
    out, h_n, c_n = reference.lstm_variant_layer(
        case.x, case.h0, case.c0, case.w_ih, case.w_hh, case.bias, None, case.w_hr, case.lengths,
        case.reverse, case.zc, case.zh, case.clip, case.ln)
    for name, got, want in [("output", fwd["output"], out), ("h_n", fwd["h_n"], h_n),
                            ("c_n", fwd["c_n_acc"], c_n)]:
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name}: {m}")


def reference_grads(case, dtype, kernel_output=None):
    """torch.autograd through reference.lstm_variant_step in `dtype`: the gradients of every input
    and parameter, and per step those of the pre-activations (dpre) and of x_t W_ih^T (dxg). With
    kernel_output (in float64), each h_t is the kernels' (rounded to the input dtype) with the
    identity's gradient, so that the gradients are those of the forward the kernels ran."""
    leaf = lambda v: None if v is None else v.detach().to(dtype).clone().requires_grad_()  # noqa: E731
    x, h0, c0, w_ih, w_hh, bias, w_hr = map(leaf, (case.x, case.h0, case.c0, case.w_ih, case.w_hh,
                                                    case.bias, case.w_hr))
    ln = None if case.ln is None else tuple(leaf(v) for v in case.ln)
    cast = lambda z: z.to(dtype) if isinstance(z, torch.Tensor) else z  # noqa: E731
    zc, zh = cast(case.zc), cast(case.zh)
    xg = F.linear(x, w_ih)
    xg.retain_grad()
    bias_steps = bias.expand(case.T, case.B, 4 * case.H).clone()
    bias_steps.retain_grad()
    h, c = h0, c0
    outputs = [None] * case.T
    for t in case.order():
        h_new, c_new = reference.lstm_variant_step(xg[t], h, c, w_hh, bias_steps[t], w_hr,
                                                   case.zone_at(zc, t), case.zone_at(zh, t),
                                                   case.clip, ln)
        if kernel_output is not None:
            h_new = h_new + (kernel_output[t].double() - h_new).detach()
        a = case.active(t).unsqueeze(1)
        h, c = torch.where(a, h_new, h), torch.where(a, c_new, c)
        outputs[t] = torch.where(a, h_new, torch.zeros_like(h_new))
    out = torch.stack(outputs)
    loss = ((out * case.go.to(dtype)).sum() + (h * case.ghn.to(dtype)).sum()
            + (c * case.gcn.to(dtype)).sum())
    loss.backward()
    g = {"grad_input": x.grad, "grad_h0": h0.grad, "grad_c0_acc": c0.grad, "grad_w_ih": w_ih.grad,
         "grad_w_hh": w_hh.grad, "grad_bias": bias.grad, "dpre": bias_steps.grad, "dxg": xg.grad}
    if case.proj:
        g["grad_w_hr"] = w_hr.grad
    if ln is not None:
        for name, v in zip(["grad_ln_ih", "grad_ln_hh", "grad_ln_c_weight", "grad_ln_c_bias"], ln):
            g[name] = v.grad
    missing = [k for k, v in g.items() if v is None]
    assert not missing, f"no reference gradient for {missing}"
    return {k: v.double() for k, v in g.items()}


# Against float64 autograd: float64 to its roundoff, float32 to a bound at float32's (relative to
# the tensor's largest element: weight gradients sum over T * B rows and cancel). 16-bit types:
# at most 4x torch's own error in that dtype plus one epsilon of the dtype at the tensor's scale.
CLOSE = {torch.float64: 1e-11, torch.float32: 3e-5}


def check_backward(case, fwd, bwd):
    if case.dtype != F64:
        check_backward_rounded(case, fwd, bwd)
    ref = reference_grads(case, F64)
    low = case.dtype not in CLOSE
    own = reference_grads(case, case.dtype) if low else None
    for name, want in ref.items():
        got = bwd[name].double()
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        scale = max(1.0, want.abs().max().item())
        e = (got - want).abs().max().item()
        if not low:
            bound = CLOSE[case.dtype] * scale
            assert e <= bound, f"{name}: error {e:.3g} against float64 autograd (bound {bound:.3g})"
        else:
            c = (own[name] - want).abs().max().item()
            bound = 4 * c + torch.finfo(case.dtype).eps * scale
            assert e <= bound, (f"{name}: error {e:.3g} against float64 autograd, torch's own in "
                                f"{_id(case.dtype)} is {c:.3g} (bound {bound:.3g})")


def check_backward_rounded(case, fwd, bwd):
    """The backward computes in the cell type from the forward's saved rows and rounds only its results
    to the input dtype (lstm_variant_host.h): against the gradients of the forward the kernels ran,
    the per-step gradients of the pre-activations and grad_c0, both kept in the cell type, are
    within its precision; grad_h0, rounded once, within half an ulp more. The reference's h_t is the kernels' (as in tests/emu/rounding.py), so that a
    rounding that went the other way cannot move it by an ulp."""
    ref = reference_grads(case, F64, kernel_output=fwd["output"])
    for name in ("dpre", "grad_c0_acc", "grad_h0"):
        got, want = bwd[name].double(), ref[name]
        allowed = acc_tol(case, want)
        if name == "grad_h0":
            allowed = allowed + rounding.half_ulp(want, case.dtype)
        err = (got - want).abs()
        bad = err > allowed
        assert not torch.as_tensor(bad).any(), \
            f"{name}: off by {err.max().item():.3g} from the rounded float64 reference"


def check_buffers(case, buffers, training, max_xg):
    T, B, H, P, K = case.T, case.B, case.H, case.P, case.K()
    x, xg, chunk, h_state, c_state, rec, m, h_cand, output, saved = buffers
    assert (x, h_state, c_state, rec, output) == (T * B * case.I, 2 * B * P, B * H, B * 4 * H,
                                                   T * B * P)
    assert (m, h_cand) == ((B * H, B * P) if case.proj else (0, 0))
    if training:
        assert (chunk, xg, saved) == (T, T * B * 4 * H, T * B * K)
    else:
        assert saved == B * K
        assert chunk == max(1, min(T, max_xg // (B * 4 * H))) and xg == chunk * B * 4 * H


def check_case(case, exe, env=None):
    fwd = case.emu_forward(exe, True, env=env)
    check_buffers(case, fwd["buffers"].tolist(), True, 1 << 24)
    max_xg = 2 * case.B * 4 * case.H  # inference projects the input two steps at a time
    inf = case.emu_forward(exe, False, env=env, max_xg=max_xg)
    check_buffers(case, inf["buffers"].tolist(), False, max_xg)
    for name in ("output", "h_n", "c_n_acc"):
        assert torch.equal(inf[name].view(torch.uint8), fwd[name].view(torch.uint8)), \
            f"inference {name} differs from training's"
    check_forward_steps(case, fwd)
    if case.dtype == F64:
        check_forward_layer_f64(case, fwd)
    bwd = case.emu_backward(exe, fwd, env=env)
    check_backward(case, fwd, bwd)
    return fwd, bwd


# Every flag combination x dtype. The kernels are instantiated per (layer norm, clip, zoneout) and
# run with and without projection: one of those two cases has lengths, in the reverse direction (so
# that a step's predecessor can be inactive), the other none, in either direction.
FLAG_CASES = [
    pytest.param(dtype, ln, clip, zone, proj,
                 id=f"{_id(dtype)}-{'ln' if ln else 'noln'}-{'clip' if clip else 'noclip'}-{zone}-"
                    f"{'proj' if proj else 'noproj'}")
    for dtype in DTYPES for ln in (False, True) for clip in (False, True) for zone in ZONEOUT
    for proj in (False, True)
]


def flag_case(dtype, ln, clip, zone, proj, dims=(4, 5, 7, 20, 13)):
    zi = list(ZONEOUT).index(zone)
    lengths = (ln + clip + zi + proj) % 2 == 0
    return VCase(dtype, ln, clip, zone, proj, lengths=lengths,
                 reverse=lengths or (zi + ln) % 2 == 1, dims=dims)


@pytest.mark.parametrize("dtype, ln, clip, zone, proj", FLAG_CASES)
def test_variant_flags(sm80, dtype, ln, clip, zone, proj):
    check_case(flag_case(dtype, ln, clip, zone, proj), sm80)


# The no-zoneout instantiations meet steps past a sequence's length with the other projection
# choice than FLAG_CASES gives them, in the forward direction, and without a bias.
NOZONE_CASES = [
    pytest.param(dtype, ln, clip, id=f"{_id(dtype)}-{'ln' if ln else 'noln'}-{'clip' if clip else 'noclip'}")
    for dtype in DTYPES for ln in (False, True) for clip in (False, True)
]


@pytest.mark.parametrize("dtype, ln, clip", NOZONE_CASES)
def test_variant_nozone_lengths_nobias(sm80, dtype, ln, clip):
    check_case(VCase(dtype, ln, clip, "nozone", proj=(ln + clip) % 2 == 0, lengths=True,
                     reverse=False, bias=False), sm80)


# Loop edges: one sequence and one unit (the layer norm of a single element), H over the 128 threads
# of a block (a thread owns two units) with P > kThreads, P > H.
SHAPES = {"t1-b1-h1-p1": (1, 1, 3, 1, 1), "t3-b2-h150-p131": (3, 2, 5, 150, 131),
          "t4-b17-h9-p24": (4, 17, 4, 9, 24)}
SHAPE_CASES = [
    pytest.param(dtype, shape, on, id=f"{_id(dtype)}-{shape}-{'all' if on else 'none'}")
    for dtype in DTYPES for shape in SHAPES for on in (False, True)
]


@pytest.mark.parametrize("dtype, shape, on", SHAPE_CASES)
def test_variant_shapes(sm80, dtype, shape, on):
    case = VCase(dtype, on, on, "masks" if on else "nozone", True, lengths=on, reverse=not on,
                 dims=SHAPES[shape])
    check_case(case, sm80)
    if not on:
        noproj = VCase(dtype, True, False, "eval", False, lengths=True, reverse=True,
                       dims=SHAPES[shape])
        check_case(noproj, sm80)


def test_variant_empty(sm80):
    """No steps: h_n is h0 and c_n is c0; nothing saved."""
    case = VCase(torch.float32, True, True, "masks", True, lengths=False, reverse=False,
                 dims=(0, 3, 2, 5, 4))
    fwd = case.emu_forward(sm80, True)
    assert fwd["output"].numel() == 0 and fwd["saved"].numel() == 0
    assert torch.equal(fwd["h_n"].double(), case.h0) and torch.equal(fwd["c_n_acc"].double(), case.c0)


def test_variant_nan_padding(sm80):
    """Steps past a sequence's length are never read: NaN in the input there changes nothing, not
    even grad_w_ih (whose zero rows of dxg would meet the padding in its product), as in the CPU op."""
    case = VCase(torch.float32, True, True, "masks", True, lengths=True, reverse=True)
    fwd = case.emu_forward(sm80)
    bwd = case.emu_backward(sm80, fwd)
    pad = torch.arange(case.T).unsqueeze(1) >= case.lengths.unsqueeze(0)  # [T, B]
    assert pad.any()
    case.x = case.x.masked_fill(pad.unsqueeze(2), float("nan"))
    fwd2 = case.emu_forward(sm80)
    bwd2 = case.emu_backward(sm80, fwd2)
    for name in fwd:
        assert torch.equal(fwd[name], fwd2[name]), f"{name} changed with NaN in the padding"
    for name in bwd:
        a, b = bwd[name], bwd2[name]
        if name == "grad_input":
            a, b = a[~pad], b[~pad]
        assert torch.equal(a, b), f"{name} changed with NaN in the padding"


# ---- The same layer through the ops (torch.ops.fastlstm.lstm_variant_forward/backward) ----
def op_args(case, device, training=True):
    """lstm_variant_forward's arguments for `case` on `device`."""
    dt, cell = case.dtype, case.cell
    on = lambda v: None if v is None else v.to(device=device, dtype=dt)  # noqa: E731
    mask = lambda z: z.to(device=device, dtype=cell) if isinstance(z, torch.Tensor) else None  # noqa: E731
    p = lambda z: z if isinstance(z, float) else 0.0  # noqa: E731
    ln = case.ln or (None,) * 4
    return (on(case.x), on(case.h0), on(case.c0), on(case.w_ih), on(case.w_hh),
            on(case.bias) if case.has_bias else None, None, on(case.w_hr),
            None if case.lengths is None else case.lengths.to(device), case.reverse,
            mask(case.zc), mask(case.zh), p(case.zc), p(case.zh), case.clip, *map(on, ln), training)


def op_backward_args(case, device, out):
    """lstm_variant_backward's arguments for `case`, after the forward op returned `out`."""
    a = op_args(case, device)
    grads = [g.to(device=device, dtype=case.dtype) for g in (case.go, case.ghn, case.gcn)]
    # input, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, the zoneout, clip and gain arguments
    return (*grads, *a[:5], *a[7:19], out[0], out[3])


OP_GRADS = ["grad_input", "grad_h0", "grad_c0_acc", "grad_w_ih", "grad_w_hh", "grad_bias",
            "grad_w_hr", "grad_ln_ih", "grad_ln_hh", "grad_ln_c_weight", "grad_ln_c_bias"]


def _cpu_variant_op():
    return (fastlstm.backend("cpu") == "compiled" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastlstm::lstm_variant_forward", "CPU"))


@pytest.mark.skipif(not _cpu_variant_op(), reason="the CPU variant op is not built")
@pytest.mark.parametrize("dtype, ln, clip, zone, proj",
                         [p for p in FLAG_CASES if p.values[0] in (F64, torch.float32)])
def test_variant_matches_cpu_op(sm80, dtype, ln, clip, zone, proj):
    """The CUDA layer code and the CPU op (csrc/cpu/variant_layer.cpp) give the same `saved` rows,
    outputs and gradients: float64 to its roundoff, float32 to float32's."""
    case = flag_case(dtype, ln, clip, zone, proj)
    fwd = case.emu_forward(sm80)
    bwd = case.emu_backward(sm80, fwd)
    out = torch.ops.fastlstm.lstm_variant_forward(*op_args(case, "cpu"))
    grads = torch.ops.fastlstm.lstm_variant_backward(*op_backward_args(case, "cpu", out))
    cpu = {"output": out[0], "h_n": out[1], "c_n_acc": out[2].to(case.cell), "saved": out[3]}
    cpu.update((n, g) for n, g in zip(OP_GRADS, grads) if g.numel())
    tol = 1e-12 if dtype == F64 else 1e-5
    for name, want in cpu.items():
        got = (fwd if name in fwd else bwd)[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=0, atol=tol * scale, msg=lambda m: f"{name}: {m}")


# ---- Scheduling: results must be bitwise the same whatever order threads and blocks run in. ----
ORDERS = [
    {"FASTLSTM_EMU_THREAD_ORDER": "reverse", "FASTLSTM_EMU_BLOCK_ORDER": "reverse"},
    {"FASTLSTM_EMU_THREAD_ORDER": "shuffle", "FASTLSTM_EMU_BLOCK_ORDER": "shuffle",
     "FASTLSTM_EMU_SEED": "3"},
]


@pytest.mark.parametrize("dtype, shape", [(torch.float32, "t3-b2-h150-p131"),
                                          (torch.bfloat16, "t4-b17-h9-p24")],
                         ids=lambda v: _id(v) if isinstance(v, torch.dtype) else v)
def test_variant_orders_bitwise(sm80, dtype, shape):
    case = VCase(dtype, True, True, "cmask", True, lengths=True, reverse=True, dims=SHAPES[shape])
    fwd = case.emu_forward(sm80)
    bwd = case.emu_backward(sm80, fwd)
    for env in ORDERS:
        for a, b in [(fwd, case.emu_forward(sm80, env=env)), (bwd, case.emu_backward(sm80, fwd, env))]:
            for name in a:
                assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), \
                    f"{name} differs between thread/block orders ({env})"


# ---- AddressSanitizer + UndefinedBehaviorSanitizer, exact-size buffers and shared arrays. ----
@pytest.fixture(scope="session")
def asan():
    return emulator.build("asan")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, ln, proj", [(torch.float64, True, True), (torch.float16, True, False),
                                             (torch.float32, False, True)],
                         ids=["float64-ln-proj", "float16-ln-noproj", "float32-noln-proj"])
def test_variant_sanitizers(asan, dtype, ln, proj):
    case = VCase(dtype, ln, True, "masks", proj, lengths=True, reverse=proj, dims=(3, 3, 5, 9, 11))
    check_case(case, asan)

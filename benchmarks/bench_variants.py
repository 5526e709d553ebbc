"""The LSTM variants of issue 29 (zoneout, weight drop, layer norm, cell clipping, and all four
together) on the CPU: fastlstm's fused path against what users run today, and against plain
fastlstm on the same shape, timed in one process.

    PYTHONPATH=$PWD python benchmarks/bench_variants.py                 # the issue's two shapes
    PYTHONPATH=$PWD python benchmarks/bench_variants.py --quick         # a tiny shape, a smoke run
    PYTHONPATH=$PWD python benchmarks/bench_variants.py --shapes 100,64,512,512 --variants layer_norm all

For each shape, variant and mode (inference: eval, under inference_mode; training: train mode,
masks drawn, forward and backward of (output, h_n) against random output gradients, with respect
to the input and every weight), the implementations are:
  fastlstm       the fused path: with --api ops (the default) fastlstm.ops.lstm_variant_layer with
                 zoneout masks drawn per call (torch.bernoulli on [T, B, H], c's then h's), and for
                 weight drop the dropped w_hh drawn per call (F.dropout's mask, before the zoneout
                 masks; fastlstm.ops.lstm_layer where weight drop is the only variant), which is
                 what fastlstm.LSTM(..., zoneout=, weight_drop=, layer_norm=, cell_clip=) does;
                 with --api module that module itself (where this fastlstm has it);
  plain          plain fastlstm (no variant) on the same shape: variant cost = fastlstm / plain;
  loop           fastlstm.reference's plain-PyTorch loop of the same variant, masks drawn the same
                 way (reference.lstm_variant_layer; reference.lstm_layer for weight drop alone,
                 AWD-LSTM's F.dropout(w_hh) then a loop of torch ops);
  torch.nn.LSTM  weight drop only: torch.nn.LSTM (oneDNN) run with the dropped w_hh through
                 torch.func.functional_call, what AWD-LSTM users run (in eval: the weights as
                 they are);
  cell-LayerNorm layer norm (alone and in the combination): a user-style LSTMCell loop of
                 nn.Linear and nn.LayerNorm modules, gates = LN_ih(W_ih x_t) + LN_hh(W_hh h) + b,
                 h = o * tanh(LN_c(c)) (with the other variants of the row added the same way).
Speedup = baseline time / fastlstm time (issue 29's target: >= 3 against the loops);
cost = fastlstm time / plain fastlstm time (target: <= 1.25).

Before a group is timed, every baseline's outputs and gradients are checked against fastlstm's
with the same masks (the benchmarks' rule, lstm_check.py, with fastlstm.reference in float64 as the
fallback oracle); a baseline that does not match is reported as MISMATCH and not timed. The
implementations of a group are timed in interleaved blocks (timing.py: warm-up, then A B C, C B A,
...; medians). Writes results.json, results.csv and results.md to --out (default
benchmarks/results/variants-<cpu>-<isa>-<date>/), with the host (CPU model and flags, fastlstm's
CPU kernels, torch, threads, allocator settings), the git revision and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import timing  # noqa: E402
from lstm_check import check  # noqa: E402

CPU = torch.device("cpu")
DTYPE = torch.float32
MODES = ("inference", "training")

# The variant configurations (fastlstm.LSTM's keyword arguments).
VARIANTS = {
    "zoneout": dict(zoneout=0.1),
    "weight_drop": dict(weight_drop=0.3),
    "layer_norm": dict(layer_norm=True),
    "cell_clip": dict(cell_clip=3.0),
    "all": dict(zoneout=0.1, weight_drop=0.3, layer_norm=True, cell_clip=3.0),
}
# Issue 29's shapes: T, B, I, H.
SHAPES = [(100, 64, 512, 512), (100, 16, 256, 256)]
QUICK_SHAPES = [(6, 3, 8, 8)]

SPEED_TARGET = 3.0  # baseline (a plain-PyTorch loop) / fastlstm, at least
COST_TARGET = 1.25  # fastlstm with the variant / plain fastlstm, at most

# The baselines, and whether issue 29's speed target is against them (the loops users fall back to;
# torch.nn.LSTM with a dropped weight is fused already, and is shown as a reference point).
BASELINES = {
    "loop": (True, "fastlstm.reference's plain-PyTorch loop of the variant"),
    "torch.nn.LSTM": (False, "torch.nn.LSTM (oneDNN) with the dropped w_hh via torch.func.functional_call"),
    "cell-LayerNorm": (True, "a user-style LSTMCell loop of nn.Linear and nn.LayerNorm modules"),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    zoneout: float = 0.0
    weight_drop: float = 0.0
    layer_norm: bool = False
    cell_clip: float | None = None

    @property
    def needs_variant_op(self):
        """Whether fastlstm runs ops.lstm_variant_layer (weight drop alone runs the plain op)."""
        return self.zoneout > 0 or self.layer_norm or self.cell_clip is not None

    def baselines(self):
        names = ["loop"]
        if self.weight_drop and not self.needs_variant_op:
            names.append("torch.nn.LSTM")
        if self.layer_norm:
            names.append("cell-LayerNorm")
        return names


def variant(name):
    return Variant(name, **VARIANTS[name])


# ---------------------------------------------------------------------------------------------------
# Weights, inputs, masks


class Case:
    """One shape and mode: the leaf tensors every implementation computes from (float32), the input,
    the states and the output gradients."""

    def __init__(self, T, B, I, H, v, training, seed=0):
        g = torch.Generator().manual_seed(seed)
        k = H**-0.5

        def uniform(*size):
            return (torch.rand(*size, generator=g) * 2 - 1) * k

        def randn(*size, scale=1.0):
            return torch.randn(*size, generator=g) * scale

        self.T, self.B, self.I, self.H, self.v, self.training = T, B, I, H, v, training
        self.weights = {"w_ih": uniform(4 * H, I), "w_hh": uniform(4 * H, H), "b_ih": uniform(4 * H),
                        "b_hh": uniform(4 * H)}
        if v.layer_norm:
            # Not the initial ones and zeros, so that the check sees each parameter used right.
            self.weights.update(g_ih=1 + randn(4 * H, scale=0.1), g_hh=1 + randn(4 * H, scale=0.1),
                                g_c=1 + randn(H, scale=0.1), b_c=randn(H, scale=0.1))
        self.x = randn(T, B, I)
        self.h0, self.c0 = randn(B, H), randn(B, H)
        self.grad_output, self.grad_h_n = randn(T, B, H), randn(B, H)
        for t in [self.x, *self.weights.values()]:
            t.requires_grad_(training)

    def to(self, dtype):
        """A copy in another dtype (the float64 oracle), the same values."""
        new = object.__new__(Case)
        new.__dict__.update(self.__dict__)
        new.weights = {k: w.detach().to(dtype).requires_grad_(self.training) for k, w in self.weights.items()}
        new.x = self.x.detach().to(dtype).requires_grad_(self.training)
        for name in ("h0", "c0", "grad_output", "grad_h_n"):
            setattr(new, name, getattr(self, name).to(dtype))
        return new

    def layer_norm(self):
        w = self.weights
        return (w["g_ih"], w["g_hh"], w["g_c"], w["b_c"]) if self.v.layer_norm else None


@dataclasses.dataclass
class Masks:
    """What one call of a variant draws: w_hh's dropout mask (scaled by 1/(1-p), as F.dropout's),
    zoneout's c and h masks [T, B, H] (1 keeps the previous value); in evaluation the zoneout
    probabilities (the expectation) and no weight drop."""

    drop: torch.Tensor | None = None
    zoneout_c: torch.Tensor | float | None = None
    zoneout_h: torch.Tensor | float | None = None

    def to(self, dtype):
        def cast(m):
            return m.to(dtype) if isinstance(m, torch.Tensor) else m

        return Masks(cast(self.drop), cast(self.zoneout_c), cast(self.zoneout_h))

    def dropped(self, w_hh):
        return w_hh if self.drop is None else w_hh * self.drop


def draw_masks(case):
    """One call's masks, in fastlstm.LSTM's order: the dropped w_hh's mask (F.dropout's draw: a
    Bernoulli(1 - p) tensor divided by 1 - p), then zoneout's c mask, then its h mask."""
    v = case.v
    if not case.training:
        z = v.zoneout or None
        return Masks(None, z, z)
    drop = None
    if v.weight_drop:
        drop = torch.empty(4 * case.H, case.H, dtype=DTYPE).bernoulli_(1 - v.weight_drop).div_(1 - v.weight_drop)
    zc = zh = None
    if v.zoneout:
        zc = torch.empty(case.T, case.B, case.H, dtype=DTYPE).bernoulli_(v.zoneout)
        zh = torch.empty(case.T, case.B, case.H, dtype=DTYPE).bernoulli_(v.zoneout)
    return Masks(drop, zc, zh)


# ---------------------------------------------------------------------------------------------------
# The implementations


@dataclasses.dataclass
class Impl:
    """run(masks) -> (output, h_n, c_n); params: (name, tensor) pairs a training step differentiates
    (besides the input); draws: it draws its own masks (the module) or needs none (plain fastlstm),
    else it is given them, drawn for each timed call; grads: maps the check's gradient names to its
    own (default: the same)."""

    run: object
    params: list
    draws: bool = False
    grads: dict | None = None


def fused_ops(case):
    import fastlstm.ops as ops

    w, v = case.weights, case.v

    def run(m):
        w_hh = m.dropped(w["w_hh"])
        if v.needs_variant_op:
            return ops.lstm_variant_layer(case.x, case.h0, case.c0, w["w_ih"], w_hh, w["b_ih"], w["b_hh"], None,
                                          None, False, m.zoneout_c, m.zoneout_h, v.cell_clip, case.layer_norm())
        return ops.lstm_layer(case.x, case.h0, case.c0, w["w_ih"], w_hh, w["b_ih"], w["b_hh"])

    return Impl(run, list(w.items()))


MODULE_NAMES = {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0",
                "g_ih": "layer_norm_weight_ih_l0", "g_hh": "layer_norm_weight_hh_l0",
                "g_c": "layer_norm_weight_c_l0", "b_c": "layer_norm_bias_c_l0"}


def module_impl(impl, case, **options):
    """fastlstm.LSTM(I, H, **options) holding the case's weights, in the case's mode."""
    module = impl.LSTM(case.I, case.H, **options)
    with torch.no_grad():
        for name, t in case.weights.items():
            getattr(module, MODULE_NAMES[name]).copy_(t)
    module.train(case.training).requires_grad_(case.training)
    h0, c0 = case.h0[None], case.c0[None]

    def run(m):
        out, (h, c) = module(case.x, (h0, c0))
        return out, h[0], c[0]

    names = {MODULE_NAMES[k]: k for k in case.weights}
    return Impl(run, [(names[n], p) for n, p in module.named_parameters()], draws=True)


def fused_module(impl, case):
    return module_impl(impl, case, **VARIANTS[case.v.name])


def has_module_api(impl):
    """Whether this fastlstm's LSTM takes the variants' keyword arguments."""
    try:
        impl.LSTM(2, 2, zoneout=0.1, weight_drop=0.1, layer_norm=True, cell_clip=1.0)
    except TypeError:
        return False
    return True


def plain_fastlstm(impl, case, api):
    """Plain fastlstm on the case's weights (the layer-norm parameters unused)."""
    import fastlstm.ops as ops

    if api == "module":
        plain = object.__new__(Case)  # the case without its layer-norm weights
        plain.__dict__.update(case.__dict__)
        plain.weights = {k: case.weights[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
        return module_impl(impl, plain)
    w = case.weights

    def run(m):
        return ops.lstm_layer(case.x, case.h0, case.c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])

    return Impl(run, [(k, w[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh")], draws=True)  # draws none


def loop(case):
    """The variant as fastlstm.reference's plain-PyTorch loop (the oracle), the masks given."""
    from fastlstm import reference

    w, v = case.weights, case.v

    def run(m):
        w_hh = m.dropped(w["w_hh"])
        if v.needs_variant_op:
            return reference.lstm_variant_layer(case.x, case.h0, case.c0, w["w_ih"], w_hh, w["b_ih"], w["b_hh"],
                                                None, None, False, m.zoneout_c, m.zoneout_h, v.cell_clip,
                                                case.layer_norm())
        return reference.lstm_layer(case.x, case.h0, case.c0, w["w_ih"], w_hh, w["b_ih"], w["b_hh"])

    return Impl(run, list(w.items()))


def torch_lstm(case):
    """torch.nn.LSTM with the (dropped) w_hh swapped in by torch.func.functional_call."""
    from torch.func import functional_call

    module = nn.LSTM(case.I, case.H).train(case.training)
    w = case.weights
    h0, c0 = case.h0[None], case.c0[None]

    def run(m):
        params = {"weight_ih_l0": w["w_ih"], "weight_hh_l0": m.dropped(w["w_hh"]), "bias_ih_l0": w["b_ih"],
                  "bias_hh_l0": w["b_hh"]}
        out, (h, c) = functional_call(module, params, (case.x, (h0, c0)))
        return out, h[0], c[0]

    return Impl(run, list(w.items()))


class UserLayerNormCell(nn.Module):
    """What a user writes for a layer-normalised LSTM (an LSTMCell of nn.Linear and nn.LayerNorm):
    gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b (b as LN_ih's bias; LN_hh has none), c~ clipped,
    h~ = o * tanh(LN_c(c~)). w_hh, when given, replaces W_hh (a dropped copy)."""

    def __init__(self, I, H, cell_clip=None):
        super().__init__()
        self.ih = nn.Linear(I, 4 * H, bias=False)
        self.hh = nn.Linear(H, 4 * H, bias=False)
        self.ln_ih = nn.LayerNorm(4 * H)
        self.ln_hh = nn.LayerNorm(4 * H, bias=False)
        self.ln_c = nn.LayerNorm(H)
        self.cell_clip = cell_clip

    def forward(self, x, state, w_hh=None):
        h, c = state
        rec = self.hh(h) if w_hh is None else F.linear(h, w_hh)
        i, f, g, o = (self.ln_ih(self.ih(x)) + self.ln_hh(rec)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.cell_clip is not None:
            c = torch.clamp(c, -self.cell_clip, self.cell_clip)
        return torch.sigmoid(o) * torch.tanh(self.ln_c(c)), c


def cell_layer_norm(case):
    """UserLayerNormCell stepped over the sequence, zoneout mixed in after each step."""
    w = case.weights
    cell = UserLayerNormCell(case.I, case.H, case.v.cell_clip)
    with torch.no_grad():
        cell.ih.weight.copy_(w["w_ih"])
        cell.hh.weight.copy_(w["w_hh"])
        cell.ln_ih.weight.copy_(w["g_ih"])
        cell.ln_ih.bias.copy_(w["b_ih"] + w["b_hh"])
        cell.ln_hh.weight.copy_(w["g_hh"])
        cell.ln_c.weight.copy_(w["g_c"])
        cell.ln_c.bias.copy_(w["b_c"])
    cell.train(case.training).requires_grad_(case.training)

    def zone(z, t, prev, cand):
        if z is None:
            return cand
        z = z[t] if isinstance(z, torch.Tensor) else z
        return z * prev + (1 - z) * cand

    def run(m):
        w_hh = None if m.drop is None else cell.hh.weight * m.drop
        h, c = case.h0, case.c0
        outputs = []
        for t in range(case.T):
            h_new, c_new = cell(case.x[t], (h, c), w_hh)
            h, c = zone(m.zoneout_h, t, h, h_new), zone(m.zoneout_c, t, c, c_new)
            outputs.append(h)
        return torch.stack(outputs), h, c

    params = [("w_ih", cell.ih.weight), ("w_hh", cell.hh.weight), ("b", cell.ln_ih.bias),
              ("g_ih", cell.ln_ih.weight), ("g_hh", cell.ln_hh.weight), ("g_c", cell.ln_c.weight),
              ("b_c", cell.ln_c.bias)]
    return Impl(run, params, grads={"b_ih": "b", "b_hh": "b"})


BASELINE_BUILDERS = {"loop": loop, "torch.nn.LSTM": torch_lstm, "cell-LayerNorm": cell_layer_norm}


# ---------------------------------------------------------------------------------------------------
# Checking and timing


def outputs(impl, case, masks, seed):
    """{output, h_n, c_n[, grad input, grad <weight>...]} of one call: a module draws its own masks
    after torch.manual_seed(seed), the others are given `masks` (drawn after the same seed)."""
    if impl.draws:
        torch.manual_seed(seed)
    out, h, c = impl.run(masks)
    result = {"output": out.detach(), "h_n": h.detach(), "c_n": c.detach()}
    if case.training:
        names = [n for n, _ in impl.params]
        grads = torch.autograd.grad((out, h), [case.x] + [p for _, p in impl.params],
                                    (case.grad_output, case.grad_h_n))
        own = dict(zip(names, grads[1:]))
        result["grad input"] = grads[0]
        for name in case.weights:
            result[f"grad {name}"] = own[(impl.grads or {}).get(name, name)]
    return result


def step_fn(impl, case):
    """What is timed: one call (masks drawn for it) under inference_mode, or one call and the
    backward of (output, h_n) with respect to the input and all of the implementation's weights."""
    if not case.training:

        def step():
            with torch.inference_mode():
                impl.run(draw_masks(case))

        return step
    wrt = [case.x] + [p for _, p in impl.params]
    grads = (case.grad_output, case.grad_h_n)

    def step():
        out, h, _ = impl.run(None if impl.draws else draw_masks(case))
        torch.autograd.grad((out, h), wrt, grads)

    return step


def agree(fast_out, base_out, ref_fn):
    """lstm_check.check both ways: its float64 fallback trusts the second side's error (torch's, in
    bench_lstm.py), and here either side may be the wrong one. Returns (ok, rule, detail)."""
    ok, rule, detail = check(fast_out, base_out, ref_fn, DTYPE, CPU, False)
    if ok and rule.startswith("direct"):
        return ok, rule, detail
    back_ok, _, back_detail = check(base_out, fast_out, ref_fn, DTYPE, CPU, False)
    if not back_ok:
        return False, "vs float64, both ways", f"the baseline against fastlstm's error: {back_detail}"
    return ok, rule + ", both ways" if ok else rule, detail


def timing_config(args):
    cfg = dict(warmup_calls=1, warmup_s=0.2, min_block_s=0.02, budget_s=8.0, min_reps=7, max_reps=51)
    if args.quick:
        cfg.update(warmup_s=0.02, budget_s=0.2, min_reps=3)
    if args.budget is not None:
        cfg["budget_s"] = args.budget
    cfg["reps"] = args.reps
    return cfg


def measure(impl_module, shape, v, mode, api, cfg, seed=0):
    """The rows of one shape, variant and mode: one per baseline."""
    T, B, I, H = shape
    base_row = dict(shape=f"T{T}-B{B}-I{I}-H{H}", T=T, B=B, I=I, H=H, variant=v.name, options=VARIANTS[v.name],
                    mode=mode, api=api, dtype="float32")
    rows = [dict(base_row, baseline=b, target_applies=BASELINES[b][0]) for b in v.baselines()]
    try:
        case = Case(T, B, I, H, v, mode == "training", seed)
        fast = fused_module(impl_module, case) if api == "module" else fused_ops(case)
        plain = plain_fastlstm(impl_module, case, api)
        baselines = {b: BASELINE_BUILDERS[b](case) for b in v.baselines()}
        # The check: every baseline against fastlstm, the same masks (seeded), float64 oracle.
        torch.manual_seed(seed)
        masks = draw_masks(case)
        fast_out = outputs(fast, case, masks, seed)
        case64 = case.to(torch.float64)
        oracle = loop(case64)

        cache = {}

        def ref_fn():
            if not cache:
                cache["ref"] = outputs(oracle, case64, masks.to(torch.float64), seed)
            return cache["ref"]

        fns = {"fastlstm": step_fn(fast, case), "plain": step_fn(plain, case)}
        for row in rows:
            ok, rule, detail = agree(fast_out, outputs(baselines[row["baseline"]], case, masks, seed), ref_fn)
            row.update(match=ok, match_rule=rule, match_detail=detail)
            if ok:
                fns[row["baseline"]] = step_fn(baselines[row["baseline"]], case)
            else:
                row.update(status="mismatch", error=detail)
        if len(fns) == 2:
            return rows
        t = timing.budgeted(fns, CPU, cfg)
    except Exception as e:  # noqa: BLE001 - recorded in the rows and printed
        for row in rows:
            row.update(status="error", error=f"{type(e).__name__}: {e}")
        return rows
    fast_s, plain_s = t["fastlstm"].median, t["plain"].median
    for row in rows:
        if row.get("status") == "mismatch":
            continue
        s = t[row["baseline"]]
        row.update(
            status="ok",
            baseline_ms=s.median * 1e3,
            fastlstm_ms=fast_s * 1e3,
            plain_ms=plain_s * 1e3,
            speedup=s.median / fast_s,
            variant_cost=fast_s / plain_s,
            baseline_ms_min=s.min * 1e3,
            fastlstm_ms_min=t["fastlstm"].min * 1e3,
            plain_ms_min=t["plain"].min * 1e3,
            baseline_iqr_pct=s.iqr_pct,
            fastlstm_iqr_pct=t["fastlstm"].iqr_pct,
            plain_iqr_pct=t["plain"].iqr_pct,
            reps=len(s.seconds),
            calls_per_rep={"baseline": s.calls, "fastlstm": t["fastlstm"].calls, "plain": t["plain"].calls},
            baseline_faults=s.faults_median,
            fastlstm_faults=t["fastlstm"].faults_median,
            plain_faults=t["plain"].faults_median,
        )
        row["speed_target_met"] = row["speedup"] >= SPEED_TARGET if row["target_applies"] else None
        row["cost_target_met"] = row["variant_cost"] <= COST_TARGET
    return rows


# ---------------------------------------------------------------------------------------------------
# Output

HEADER = ["shape", "variant", "mode", "baseline", "baseline ms", "fastlstm ms", "speedup", "plain ms", "cost",
          "iqr%"]
CSV_FIELDS = [
    "shape", "T", "B", "I", "H", "variant", "mode", "api", "baseline", "target_applies", "baseline_ms",
    "fastlstm_ms", "plain_ms", "speedup", "variant_cost", "speed_target_met", "cost_target_met", "status",
    "match", "match_rule", "baseline_ms_min", "fastlstm_ms_min", "plain_ms_min", "baseline_iqr_pct",
    "fastlstm_iqr_pct", "plain_iqr_pct", "reps", "baseline_faults", "fastlstm_faults", "plain_faults", "error",
]  # fmt: skip


LEFT = {0, 1, 2, 3}


def column_widths(shapes):
    """The table's column widths, fixed before the first row (rows are printed as they come)."""
    cells = [[f"T{T}-B{B}-I{I}-H{H}" for T, B, I, H in shapes], list(VARIANTS), list(MODES), list(BASELINES),
             ["12345.6"], ["12345.6"], ["1234.56x (ref.)"], ["12345.6"], ["12.34x"], ["100"]]
    return [max(len(h), *(len(c) for c in col)) for h, col in zip(HEADER, cells)]


def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def table_cells(r):
    if r.get("status") == "ok":
        speed = f"{r['speedup']:.2f}x" + ("" if r["target_applies"] else " (ref.)")
        cost = f"{r['variant_cost']:.2f}x"
        spread = [v for v in (r["baseline_iqr_pct"], r["fastlstm_iqr_pct"], r["plain_iqr_pct"]) if v is not None]
        iqr = f"{max(spread):.0f}" if spread else "-"
    else:
        speed, cost, iqr = ("MISMATCH" if r.get("status") == "mismatch" else "ERROR"), "-", "-"
    return [r["shape"], r["variant"], r["mode"], r["baseline"], fmt_ms(r.get("baseline_ms")),
            fmt_ms(r.get("fastlstm_ms")), speed, fmt_ms(r.get("plain_ms")), cost, iqr]


def summaries(rows):
    """Geometric means per mode: the speedup over the loops (the target's baselines), over each
    baseline, and the variant cost (one value per shape and variant); and how many meet the targets."""
    result = {}
    ok = [r for r in rows if r.get("status") == "ok"]
    for mode in MODES:
        picked = [r for r in ok if r["mode"] == mode]
        if not picked:
            continue
        loops = [r for r in picked if r["target_applies"]]
        result[f"speedup over loops, {mode}"] = timing.geomean([r["speedup"] for r in loops])
        for b in BASELINES:
            these = [r["speedup"] for r in picked if r["baseline"] == b]
            if these:
                result[f"speedup over {b}, {mode}"] = timing.geomean(these)
        costs = {(r["shape"], r["variant"]): r["variant_cost"] for r in picked}
        result[f"variant cost, {mode}"] = timing.geomean(list(costs.values()))
    return result


def targets(rows):
    """(rows meeting the speed target, rows it applies to, groups meeting the cost target, groups)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    speed = [r for r in ok if r["target_applies"]]
    groups = {(r["shape"], r["variant"], r["mode"]): r["cost_target_met"] for r in ok}
    return (sum(r["speed_target_met"] for r in speed), len(speed), sum(groups.values()), len(groups))


def header_lines(env):
    cpu_line, alloc_line = report.host_lines(env)
    return [
        f"host: {env['cpu']}, {env['threads']} threads ({env['cpu_count']} CPUs); torch {env['torch']}; "
        f"fastlstm {env['fastlstm_version']} (backend {env['fastlstm_backend']}, variant op "
        f"{env['fastlstm_variant_backend']}), api {env['api']}",
        cpu_line,
        alloc_line,
        f"git {env['git']}; command: {env['command']}",
    ]


def markdown(env, rows, geo):
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    n_speed, of_speed, n_cost, of_cost = targets(rows)
    out = [f"# fastlstm's LSTM variants on the CPU ({env['date']})", ""]
    out += [f"- {h}" for h in header_lines(env)]
    out += [
        f"- speedup = baseline / fastlstm (target >= {SPEED_TARGET:g}x against the loops; `(ref.)`: "
        f"torch.nn.LSTM, a fused reference point); cost = fastlstm / plain fastlstm (target <= "
        f"{COST_TARGET:g}x); medians of interleaved blocks; iqr%: the widest interquartile range of the row's "
        "three implementations, as a percentage of its median",
        f"- targets: speedup met in {n_speed} of {of_speed} loop rows, cost met in {n_cost} of {of_cost} "
        "shape/variant/mode groups",
        "",
        line(HEADER),
        line(["---"] * len(HEADER)),
    ]
    out += [line(table_cells(r)) for r in rows]
    out += ["", "| geometric mean | value |", "| --- | --- |"]
    out += [line([k, f"{g:.2f}x" if g else "-"]) for k, g in geo.items()]
    return "\n".join(out) + "\n"


def host_slug(env):
    """`zen5-avx512`: the CPU (its Zen generation, else its model name) and fastlstm's CPU kernels."""
    m = re.search(r"Zen (\d)", env["cpu"])
    name = re.sub(r" \(family .*|\((R|TM)\)|\bCPU\b|@.*", "", env["cpu"], flags=re.IGNORECASE)
    cpu = f"zen{m.group(1)}" if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "-".join(p for p in (cpu[:40] or "cpu", env.get("fastlstm_cpu_isa") or "") if p)


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four integers), got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four positive integers), got {text!r}")
    return shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="T,B,I,H",
                   help="shapes instead of issue 29's 100,64,512,512 and 100,16,256,256")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all five")
    p.add_argument("--mode", choices=["inference", "training", "both"], default="both")
    p.add_argument("--api", choices=["ops", "module"], default="ops",
                   help="ops: fastlstm.ops with the masks drawn here, as the module draws them (default); "
                        "module: fastlstm.LSTM(..., zoneout=, weight_drop=, layer_norm=, cell_clip=)")
    p.add_argument("--quick", action="store_true", help=f"the shape {QUICK_SHAPES[0]}, short timing (a smoke run)")
    p.add_argument("--reps", type=int, help="timed blocks per implementation (default: fit --budget)")
    p.add_argument("--budget", type=float, help="seconds of timing per shape, variant and mode (default 8)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", help="output folder (default benchmarks/results/variants-<cpu>-<isa>-<date>/)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impl = report.load_impl("fastlstm")
    import fastlstm.ops as ops

    if args.api == "module" and not has_module_api(impl):
        sys.exit(f"--api module: this fastlstm ({impl.__file__}) has no LSTM(zoneout=, weight_drop=, "
                 "layer_norm=, cell_clip=); use --api ops")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    variants = [variant(n) for n in (args.variants or VARIANTS)]
    modes = list(MODES) if args.mode == "both" else [args.mode]

    env = report.environment(CPU, impl)
    env.update(
        fastlstm_variant_backend="compiled" if ops._VARIANT_COMPILED.get("cpu", False) else "reference",
        # `git` is this script's checkout; the fastlstm measured is the one imported from here.
        fastlstm_path=os.path.dirname(os.path.abspath(impl.__file__)),
        module_api=has_module_api(impl),
        api=args.api,
        dtype="float32",
        shapes=[list(s) for s in shapes],
        variants={v.name: VARIANTS[v.name] for v in variants},
        modes=modes,
        targets={"speedup_at_least": SPEED_TARGET, "variant_cost_at_most": COST_TARGET},
        baselines={k: d for k, (_, d) in BASELINES.items()},
        timing="median of interleaved blocks; perf_counter",
        quick=args.quick,
        load_average_before=os.getloadavg(),
    )
    out_dir = args.out or os.path.join(report.HERE, "results",
                                       f"variants-{host_slug(env)}-{datetime.date.today().isoformat()}")
    for line in header_lines(env):
        print(line, flush=True)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f} before starting: other processes share the CPU")
    if env["fastlstm_variant_backend"] == "reference":
        print("warning: fastlstm has no compiled variant op for the CPU; timing its plain-PyTorch fallback")

    cfg = timing_config(args)
    widths = column_widths(shapes)
    print(report.table_row(HEADER, widths, LEFT))
    print("  ".join("-" * w for w in widths), flush=True)
    rows = []
    t_start = time.perf_counter()
    try:
        for shape in shapes:
            for v in variants:
                for mode in modes:
                    new = measure(impl, shape, v, mode, args.api, cfg)
                    for r in new:
                        print(report.table_row(table_cells(r), widths, LEFT), flush=True)
                    rows.extend(new)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far")
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    env["load_average_after"] = os.getloadavg()
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['status'].upper()}: {r['shape']} {r['variant']} {r['mode']} {r['baseline']}: {r['error']}")

    geo = summaries(rows)
    n_speed, of_speed, n_cost, of_cost = targets(rows)
    print()
    for key, g in geo.items():
        print(f"geometric mean {key}: " + (f"{g:.2f}x" if g else "-"))
    print(f"targets: speedup >= {SPEED_TARGET:g}x in {n_speed} of {of_speed} loop rows; "
          f"cost <= {COST_TARGET:g}x in {n_cost} of {of_cost} groups")
    noisy = [r for r in rows if max(r.get("baseline_iqr_pct") or 0, r.get("fastlstm_iqr_pct") or 0,
                                    r.get("plain_iqr_pct") or 0) > 25]
    if noisy:
        print(f"{len(noisy)} rows have an interquartile range above 25% of the median (iqr%): the machine was busy")
    report.write_json(os.path.join(out_dir, "results.json"), env, rows, geomeans=geo,
                      targets_met={"speedup": [n_speed, of_speed], "variant_cost": [n_cost, of_cost]})
    report.write_csv(os.path.join(out_dir, "results.csv"), rows, CSV_FIELDS)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(env, rows, geo))
    print(f"\n{len(rows)} rows in {env['seconds']:.0f} s; wrote {out_dir}/results.{{json,csv,md}}")


if __name__ == "__main__":
    main()

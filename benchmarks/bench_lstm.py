"""fastlstm.LSTM against torch.nn.LSTM: the same weights, dtype and TF32 setting, timed in one process.

    python benchmarks/bench_lstm.py                       # CUDA if available, else CPU; default grid
    python benchmarks/bench_lstm.py --quick               # a few small shapes, a smoke run
    python benchmarks/bench_lstm.py --device cpu --dtype all --mode training --filter fastrnns

For each shape and dtype, fastlstm's outputs (and, for training, every gradient) are first checked
against torch.nn.LSTM's; a shape that does not match is reported as MISMATCH and not timed. The two
implementations are then timed in alternating blocks (A B, B A, ...) so that machine noise hits both;
each is reported as the median over the blocks. On CUDA a block is timed with CUDA events.

Writes results.csv, results.json and speedup.png to --out (default
benchmarks/results/<device>-<date>/) and prints a table with the geometric mean speedup per mode.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import _common

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MODES = ("inference", "training")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    variable_length: bool = False
    P: int = 0  # proj_size
    low_precision_on_cpu: bool = False  # bfloat16 in the CPU grid under --dtype all
    decode: bool = False  # step-by-step decoding: T calls with one timestep each, state carried (inference only)

    @property
    def dirs(self):
        return 2 if self.bidirectional else 1

    def fp16_friendly(self):
        """Where cuDNN's half-precision kernels are at their best (tensor-core multiples)."""
        dims = [self.H, self.I] + ([self.P] if self.P else [])
        return all(d % 128 == 0 for d in dims) and self.B % 8 == 0 and self.B <= 128


# PyTorch's benchmarks/fastrnns default: T=100, B=64, I=H=512, one layer.
GPU_GRID = [
    Shape("fastrnns", 100, 64, 512, 512),
    Shape("4-layers", 100, 64, 512, 512, layers=4),
    Shape("batch1-h512", 100, 1, 512, 512),
    Shape("batch4-h512", 100, 4, 512, 512),
    Shape("batch8-h512", 100, 8, 512, 512),
    Shape("batch1-h1024", 100, 1, 1024, 1024),
    Shape("batch4-h1024", 100, 4, 1024, 1024),
    Shape("batch8-h1024", 100, 8, 1024, 1024),
    Shape("seq1000", 1000, 64, 512, 512),
    Shape("bidir-2-layers", 100, 64, 512, 512, layers=2, bidirectional=True),
    Shape("h128", 100, 64, 128, 128),
    Shape("h2048", 100, 64, 2048, 2048),
    Shape("varlen", 100, 64, 512, 512, variable_length=True),
]

# The same regimes, scaled to run in a few minutes on a 2-core CPU.
CPU_GRID = [
    Shape("fastrnns", 100, 64, 512, 512, low_precision_on_cpu=True),
    Shape("batch1-h128", 100, 1, 128, 128, low_precision_on_cpu=True),
    Shape("batch1-h512", 100, 1, 512, 512, low_precision_on_cpu=True),
    Shape("seq1000", 1000, 8, 128, 128),
    Shape("3-layers", 100, 16, 256, 256, layers=3),
    Shape("bidir-2-layers", 100, 16, 256, 256, layers=2, bidirectional=True),
    Shape("h128", 100, 64, 128, 128),
    Shape("h1024", 100, 16, 1024, 1024),
    Shape("varlen", 100, 64, 256, 256, variable_length=True),
    Shape("decode-h512", 100, 16, 512, 512, decode=True),
]

QUICK_GRID = [
    Shape("quick-small", 50, 16, 128, 128, low_precision_on_cpu=True),
    Shape("quick-batch1", 50, 1, 64, 64),
    Shape("quick-bidir-2-layers", 20, 4, 32, 48, layers=2, bidirectional=True),
    Shape("quick-proj", 20, 8, 32, 64, P=16),
    Shape("quick-varlen", 30, 8, 64, 64, variable_length=True),
]


def plan(grid, dtype_arg, device):
    """(shape, dtype name) pairs to run. Default: float32 on CPU; float32, bfloat16 and float16
    (the last on cuDNN-friendly shapes only) on CUDA. `all` on CPU adds bfloat16 where marked.
    float64 only when named."""
    if dtype_arg is None:
        dtype_arg = ["all"] if device.type == "cuda" else ["float32"]
    if "all" in dtype_arg:
        explicit = None
    else:
        explicit = [d for d in DTYPES if d in dtype_arg]
    items = []
    for shape in grid:
        for dtype in DTYPES:
            if explicit is not None:
                wanted = dtype in explicit and (dtype != "float16" or device.type == "cpu" or shape.fp16_friendly())
            elif device.type == "cuda":
                wanted = dtype in ("float32", "bfloat16") or (dtype == "float16" and shape.fp16_friendly())
            else:
                wanted = dtype == "float32" or (dtype == "bfloat16" and shape.low_precision_on_cpu)
            if wanted:
                items.append((shape, dtype))
    return items


def gate_flops(shape, tokens):
    """Forward FLOPs of the gate matmuls, 2 * tokens * 4H * (input + P) summed over layers and
    directions (a layer above a bidirectional one reads 2P features)."""
    P = shape.P or shape.H
    total = 0
    for layer in range(shape.layers):
        in_features = shape.I if layer == 0 else P * shape.dirs
        total += 2 * tokens * 4 * shape.H * (in_features + P) * shape.dirs
    return total


# ---------------------------------------------------------------------------------------------------
# Models and inputs


def lstm_kwargs(shape):
    kw = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    if shape.P:
        kw["proj_size"] = shape.P
    return kw


def build_models(impl, shape, device, dtype):
    torch.manual_seed(0)
    fast = impl.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=dtype)
    base = torch.nn.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=dtype)
    base.load_state_dict(fast.state_dict())
    base.flatten_parameters()
    return fast, base


class Inputs:
    """One input, shared by both models: a [T, B, I] tensor or a PackedSequence, (h0, c0), and the
    output gradients used for training. `x` is the leaf that gets a gradient."""

    def __init__(self, shape, device, dtype, seed=1):
        g = torch.Generator().manual_seed(seed)
        P = shape.P or shape.H

        def randn(*size):
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        x = randn(shape.T, shape.B, shape.I)
        self.h0 = randn(shape.layers * shape.dirs, shape.B, P)
        self.c0 = randn(shape.layers * shape.dirs, shape.B, shape.H)
        if shape.variable_length:
            # PyTorch fastrnns' variable-length setting: lengths uniform in [30, 100).
            lo, hi = min(30, shape.T), shape.T
            lengths = torch.randint(lo, hi, (shape.B,), generator=g) if hi > lo else torch.full((shape.B,), hi)
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            self.x = packed.data.detach().requires_grad_()
            self.input = PackedSequence(self.x, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            self.tokens = int(lengths.sum())
        else:
            self.x = x.requires_grad_()
            self.input = self.x
            self.tokens = shape.T * shape.B
        out_rows = self.x.shape[0] if shape.variable_length else shape.T
        out_shape = (out_rows, shape.B, P * shape.dirs) if not shape.variable_length else (out_rows, P * shape.dirs)
        self.grad_output = randn(*out_shape)
        self.grad_h_n = randn(*self.h0.shape)
        self.grad_c_n = randn(*self.c0.shape)
        self.decode = shape.decode

    def to(self, dtype):
        """The same values in another dtype (for the float64 reference)."""
        other = object.__new__(Inputs)
        other.x = self.x.detach().to(dtype).requires_grad_()
        if isinstance(self.input, PackedSequence):
            other.input = PackedSequence(
                other.x, self.input.batch_sizes, self.input.sorted_indices, self.input.unsorted_indices
            )
        else:
            other.input = other.x
        for name in ("h0", "c0", "grad_output", "grad_h_n", "grad_c_n"):
            setattr(other, name, getattr(self, name).to(dtype))
        other.tokens = self.tokens
        other.decode = self.decode
        return other


def output_data(out):
    return out.data if isinstance(out, PackedSequence) else out


def decode_steps(model, inp):
    """One call per timestep (x[t:t+1]), the state carried between calls, as a decoder runs."""
    state, outs = (inp.h0, inp.c0), []
    for t in range(inp.x.shape[0]):
        out, state = model(inp.x[t : t + 1], state)
        outs.append(out)
    return torch.cat(outs), state


def run_forward(model, inp):
    with torch.inference_mode():
        out, (h, c) = decode_steps(model, inp) if inp.decode else model(inp.input, (inp.h0, inp.c0))
    return {"output": output_data(out), "h_n": h, "c_n": c}


def run_training(model, inp):
    """Forward and backward; returns outputs and the gradients of the input and every parameter."""
    names, params = zip(*model.named_parameters())
    out, (h, c) = model(inp.input, (inp.h0, inp.c0))
    grads = torch.autograd.grad(
        (output_data(out), h, c), (inp.x,) + params, (inp.grad_output, inp.grad_h_n, inp.grad_c_n)
    )
    result = {"output": output_data(out).detach(), "h_n": h.detach(), "c_n": c.detach(), "grad input": grads[0]}
    result.update({f"grad {n}": g for n, g in zip(names, grads[1:])})
    return result


def step_fn(model, inp, mode):
    """What is timed: a forward under inference_mode, or forward + backward of (output, h_n) with
    respect to the input and all parameters."""
    params = tuple(model.parameters())
    if mode == "inference":

        def step():
            with torch.inference_mode():
                if inp.decode:
                    decode_steps(model, inp)
                else:
                    model(inp.input, (inp.h0, inp.c0))

    else:

        def step():
            out, (h, _) = model(inp.input, (inp.h0, inp.c0))
            torch.autograd.grad((output_data(out), h), (inp.x,) + params, (inp.grad_output, inp.grad_h_n))

    return step


# ---------------------------------------------------------------------------------------------------
# Correctness


def tolerance(dtype, device, tf32):
    """rtol = atol for a direct comparison with torch.nn.LSTM in float32 or float64 (None: use the
    float64 rule)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype != torch.float32 or (device.type == "cuda" and tf32):
        return None
    return 1e-4 if device.type == "cpu" else 2e-4


def check(impl_out, base_out, ref_fn, dtype, device, tf32):
    """Whether fastlstm matches torch.nn.LSTM. Returns (ok, rule, detail).

    float32 (no TF32): assert_close(fast, torch, rtol=atol=1e-4), atol scaled by the tensor's
    magnitude for gradients (sums over T*B). If that fails, and for bfloat16/float16/TF32 always,
    flash-attention's rule: fastlstm's max error against a float64 torch.nn.LSTM is at most
    3x torch.nn.LSTM's own error in the same dtype, plus one ulp of the dtype at the tensor's scale.
    """
    missing = sorted(set(base_out) ^ set(impl_out))
    if missing:
        return False, "names", f"outputs/gradients present in only one implementation: {missing}"
    tol = tolerance(dtype, device, tf32)
    if tol is not None:
        try:
            for key, b in base_out.items():
                f = impl_out[key]
                scale = max(1.0, b.abs().max().item()) if key.startswith("grad") else 1.0
                torch.testing.assert_close(f, b, rtol=tol, atol=tol * scale, msg=lambda m, k=key: f"{k}: {m}")
            return True, f"direct rtol=atol={tol:g}", ""
        except AssertionError as e:
            direct_failure = str(e).splitlines()[0]
    else:
        direct_failure = None
    ref_out = ref_fn()
    eps = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    worst = ""
    worst_ratio = 0.0
    try:
        for key, r in ref_out.items():
            b = base_out[key].double()
            f = impl_out[key].double()
            scale = max(1.0, r.abs().max().item())
            base_err = (b - r).abs().max().item()
            atol = 3 * base_err + eps * scale
            fast_err = (f - r).abs().max().item()
            if fast_err / atol > worst_ratio:
                worst_ratio = fast_err / atol
                worst = f"{key}: fastlstm err {fast_err:.3g}, torch err {base_err:.3g}"
            torch.testing.assert_close(f, r, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    except AssertionError as e:
        detail = str(e).splitlines()[0]
        if direct_failure:
            detail = f"{direct_failure}; vs float64: {detail}"
        return False, "vs float64", detail
    rule = "vs float64 (<= 3x torch error)"
    detail = worst
    if direct_failure:
        detail = f"direct check failed ({direct_failure}); passed {rule}. worst {worst}"
    return True, rule, detail


def reference_fn(shape, base, inp, device, mode):
    """torch.nn.LSTM in float64 on the same weights and (rounded) inputs."""

    def ref():
        ref_model = torch.nn.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=torch.float64)
        ref_model.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
        ref_inp = inp.to(torch.float64)
        out = run_forward(ref_model, ref_inp) if mode == "inference" else run_training(ref_model, ref_inp)
        return out

    return ref


# ---------------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults():
    """Minor page faults of this process so far (0 where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_block(fn, number, device, faults=None):
    """Seconds per call of `number` back-to-back calls (CUDA events on GPU). On the CPU, when
    `faults` is a list, appends the minor page faults per call of the block (memory the allocator
    had to map afresh: glibc's malloc hands large freed blocks back to the kernel)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    f0 = minor_faults()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    seconds = (time.perf_counter() - t0) / number
    if faults is not None:
        faults.append((minor_faults() - f0) / number)
    return seconds


def warm_up(fn, device, min_calls, min_seconds):
    """Calls fn until both minimums are met; returns the last call's time."""
    calls, t_start = 0, time.perf_counter()
    while True:
        t = time_block(fn, 1, device)
        calls += 1
        if calls >= min_calls and time.perf_counter() - t_start >= min_seconds:
            return t


def time_pair(fn_a, fn_b, device, cfg, faults=None):
    """Times fn_a and fn_b in alternating blocks (a b, b a, a b, ...); returns per-call seconds of
    every block for each. On the CPU, `faults` (a dict) gets "a" and "b": the median over blocks of
    the minor page faults per call."""
    t_a = warm_up(fn_a, device, cfg["warmup_calls"], cfg["warmup_s"])
    t_b = warm_up(fn_b, device, cfg["warmup_calls"], cfg["warmup_s"])
    n_a = max(1, math.ceil(cfg["min_block_s"] / max(t_a, 1e-9)))
    n_b = max(1, math.ceil(cfg["min_block_s"] / max(t_b, 1e-9)))
    if cfg["reps"]:
        rounds = cfg["reps"]
    else:
        per_round = n_a * t_a + n_b * t_b
        rounds = int(min(cfg["max_reps"], max(cfg["min_reps"], cfg["budget_s"] // max(per_round, 1e-9))))
    times_a, times_b = [], []
    faults_a, faults_b = [], []
    deadline = time.perf_counter() + 2 * cfg["budget_s"]  # a busy machine must not stretch the run
    for r in range(rounds):
        if not cfg["reps"] and r >= cfg["min_reps"] and time.perf_counter() > deadline:
            break
        order = ((fn_a, n_a, times_a, faults_a), (fn_b, n_b, times_b, faults_b))
        for fn, n, times, flt in order if r % 2 == 0 else reversed(order):
            times.append(time_block(fn, n, device, flt))
    if faults is not None and device.type == "cpu":
        faults.update(a=statistics.median(faults_a), b=statistics.median(faults_b))
    return times_a, times_b, (n_a, n_b)


def timing_config(device, args):
    if device.type == "cuda":
        cfg = dict(warmup_calls=3, warmup_s=0.2, min_block_s=0.01, budget_s=2.0, min_reps=10, max_reps=100)
    else:
        cfg = dict(warmup_calls=1, warmup_s=0.2, min_block_s=0.02, budget_s=8.0, min_reps=7, max_reps=51)
    if args.quick:
        cfg.update(warmup_s=0.05, budget_s=0.3, min_reps=5)
    if args.budget is not None:
        cfg["budget_s"] = args.budget
    cfg["reps"] = args.reps
    return cfg


# ---------------------------------------------------------------------------------------------------
# Running the grid


def measure(impl, shape, dtype_name, modes, device, cfg, tf32):
    """Rows for one shape and dtype, one per mode."""
    dtype = DTYPES[dtype_name]
    base_row = {
        "name": shape.name,
        "T": shape.T,
        "B": shape.B,
        "I": shape.I,
        "H": shape.H,
        "layers": shape.layers,
        "bidirectional": shape.bidirectional,
        "variable_length": shape.variable_length,
        "dtype": dtype_name,
        "device": device.type,
        "proj_size": shape.P,
    }
    rows = []
    try:
        fast, base = build_models(impl, shape, device, dtype)
        inp = Inputs(shape, device, dtype)
    except Exception as e:  # noqa: BLE001 - a shape that cannot be built is reported, not hidden
        return [dict(base_row, mode=m, **error_fields("error", f"setup: {type(e).__name__}: {e}")) for m in modes]
    flops = gate_flops(shape, inp.tokens)
    for mode in modes:
        if shape.decode and mode == "training":
            continue  # decoding is inference
        row = dict(base_row, mode=mode, tokens=inp.tokens)
        try:
            run = run_forward if mode == "inference" else run_training
            base_out = run(base, inp)
            fast_out = run(fast, inp)
            ok, rule, detail = check(fast_out, base_out, reference_fn(shape, base, inp, device, mode), dtype, device, tf32)
            del base_out, fast_out
            row.update(match=ok, match_rule=rule, match_detail=detail)
            if not ok:
                row.update(error_fields("mismatch", detail))
                rows.append(row)
                continue
            faults = {}
            times_b, times_f, (n_b, n_f) = time_pair(
                step_fn(base, inp, mode), step_fn(fast, inp, mode), device, cfg, faults
            )
        except Exception as e:  # noqa: BLE001 - recorded in the row and printed
            row.update(error_fields("error", f"{type(e).__name__}: {e}"))
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        mode_flops = flops * (3 if mode == "training" else 1)
        base_s, fast_s = statistics.median(times_b), statistics.median(times_f)
        row.update(
            status="ok",
            baseline_ms=base_s * 1e3,
            fastlstm_ms=fast_s * 1e3,
            speedup=base_s / fast_s,
            baseline_ms_min=min(times_b) * 1e3,
            fastlstm_ms_min=min(times_f) * 1e3,
            baseline_iqr_pct=iqr_pct(times_b),
            fastlstm_iqr_pct=iqr_pct(times_f),
            reps=len(times_b),
            calls_per_rep={"baseline": n_b, "fastlstm": n_f},
            gate_flops=mode_flops,
            fastlstm_tflops=mode_flops / fast_s / 1e12,
            baseline_tflops=mode_flops / base_s / 1e12,
            baseline_faults=faults.get("a"),
            fastlstm_faults=faults.get("b"),
        )
        rows.append(row)
    if device.type == "cuda":
        del fast, base, inp
        torch.cuda.empty_cache()
    return rows


def error_fields(status, message):
    return dict(
        status=status,
        match=False if status == "mismatch" else None,
        baseline_ms=None,
        fastlstm_ms=None,
        speedup=None,
        error=message,
    )


def iqr_pct(times):
    if len(times) < 4:
        return None
    q = statistics.quantiles(times, n=4)
    return 100 * (q[2] - q[0]) / statistics.median(times)


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# ---------------------------------------------------------------------------------------------------
# Output

COLUMNS = ["name", "T", "B", "I", "H", "layers", "bidir", "varlen", "dtype", "mode", "torch ms", "fastlstm ms", "speedup", "iqr%"]


def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_faults(v):
    return "-" if v is None else f"{v:.0f}"


def table(rows, device):
    flops_col = "fast TFLOP/s" if device.type == "cuda" else "fast GFLOP/s"
    cpu = device.type == "cpu"
    # CPU: minor page faults per call of each (see time_block), the usual reason torch's time on
    # large shapes depends on the allocator's state and fastlstm's does not.
    header = COLUMNS + [flops_col] + (["torch flt", "fast flt"] if cpu else [])
    lines = []
    for r in rows:
        if r.get("status") == "ok":
            speed = f"{r['speedup']:.2f}x"
            spread = [v for v in (r["baseline_iqr_pct"], r["fastlstm_iqr_pct"]) if v is not None]
            iqr = f"{max(spread):.0f}" if spread else "-"
            tf = r["fastlstm_tflops"]
            flops = f"{tf:.1f}" if device.type == "cuda" else f"{tf * 1e3:.1f}"
        else:
            speed, flops, iqr = ("MISMATCH" if r.get("status") == "mismatch" else "ERROR"), "-", "-"
        lines.append(
            [
                r["name"] + (f" P={r['proj_size']}" if r.get("proj_size") else ""),
                r["T"],
                r["B"],
                r["I"],
                r["H"],
                r["layers"],
                "y" if r["bidirectional"] else "-",
                "y" if r["variable_length"] else "-",
                r["dtype"],
                r["mode"],
                fmt_ms(r.get("baseline_ms")),
                fmt_ms(r.get("fastlstm_ms")),
                speed,
                iqr,
                flops,
            ]
            + ([fmt_faults(r.get("baseline_faults")), fmt_faults(r.get("fastlstm_faults"))] if cpu else [])
        )
    cells = [header] + [[str(c) for c in line] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    left = {0, 8, 9}
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summaries(rows):
    """Geometric mean speedup per mode, and per mode and dtype when there are several dtypes."""
    result = {}
    dtypes = sorted({r["dtype"] for r in rows})
    for mode in MODES:
        picked = [r for r in rows if r["mode"] == mode]
        if not picked:
            continue
        result[mode] = geomean([r.get("speedup") for r in picked])
        if len(dtypes) > 1:
            for d in dtypes:
                result[f"{mode} {d}"] = geomean([r.get("speedup") for r in picked if r["dtype"] == d])
    return result


CSV_FIELDS = [
    "name", "T", "B", "I", "H", "proj_size", "layers", "bidirectional", "variable_length", "dtype", "mode",
    "baseline_ms", "fastlstm_ms", "speedup", "device", "status", "match", "match_rule", "tokens", "gate_flops",
    "baseline_tflops", "fastlstm_tflops", "baseline_ms_min", "fastlstm_ms_min", "baseline_iqr_pct",
    "fastlstm_iqr_pct", "reps", "baseline_faults", "fastlstm_faults", "error",
]  # fmt: skip


def write_results(out_dir, env, rows, geo):
    os.makedirs(out_dir, exist_ok=True)
    doc = dict(env, geomean_speedup=geo, rows=rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})


def plot(path, env, rows, geo):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullLocator

    labels = []
    for r in rows:
        label = f"{r['name']} · {r['dtype']}"
        if label not in labels:
            labels.append(label)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    colors = {"inference": "#4C72B0", "training": "#DD8452"}
    height = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(labels) * len(modes)))
    speedups = [r["speedup"] for r in rows if r.get("speedup")]
    lo = min(speedups + [0.8]) / 1.4
    hi = max(speedups + [1.25]) * 1.4
    for k, mode in enumerate(modes):
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["mode"] == mode and f"{r['name']} · {r['dtype']}" == label), None)
            if r is None:
                continue
            y = i + (k - (len(modes) - 1) / 2) * height
            if r.get("speedup"):
                v = r["speedup"]
                ax.barh(y, v - 1, height=height * 0.9, color=colors[mode], left=1)
                ax.text(v * (1.02 if v >= 1 else 0.98), y, f"{v:.2f}", va="center", ha="left" if v >= 1 else "right", fontsize=7)
            else:
                text = "MISMATCH" if r.get("status") == "mismatch" else "ERROR"
                ax.text(lo * 1.05, y, f"{mode}: {text}", va="center", fontsize=7, color="red")
    handles = [
        Patch(color=colors[m], label=f"{m} (geomean {geo[m]:.2f}x)" if geo.get(m) else m) for m in modes
    ]
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("speedup = torch.nn.LSTM time / fastlstm time  (> 1: fastlstm faster)", fontsize=9)
    backend = env.get("fastlstm_backend")
    ax.set_title(
        f"fastlstm vs torch.nn.LSTM on {env['device']}"
        + (f" ({env['cpu']}, {env['threads']} threads)" if env["device_type"] == "cpu" else "")
        + (f", TF32 {'on' if env['tf32']['cudnn.allow_tf32'] else 'off'}" if env.get("tf32") else "")
        + f"\ntorch {env['torch']}, fastlstm backend {backend}, {env['date'][:10]}",
        fontsize=10,
    )
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=len(modes), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def parse_shape(text):
    """A Shape from --shape's T,B,I,H[,layers=N][,proj=P][,bidir][,varlen][,decode], named after
    its fields; bfloat16 runs on it under --dtype all, as on the grid's marked shapes."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        T, B, I, H = (int(v) for v in parts[:4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four integers) first, got {text!r}") from None
    kw = dict(low_precision_on_cpu=True)
    flags = {"bidir": "bidirectional", "varlen": "variable_length", "decode": "decode"}
    for opt in parts[4:]:
        key, _, value = opt.partition("=")
        if key in flags and not value:
            kw[flags[key]] = True
        elif key in ("layers", "proj") and value.isdigit():
            kw["layers" if key == "layers" else "P"] = int(value)
        else:
            raise argparse.ArgumentTypeError(f"unknown shape option {opt!r} (layers=N, proj=P, bidir, varlen, decode)")
    if min(T, B, I, H) < 1 or kw.get("layers", 1) < 1:
        raise argparse.ArgumentTypeError(f"T, B, I, H and layers must be positive, got {text!r}")
    name = "-".join([f"T{T}-B{B}-I{I}-H{H}"] + parts[4:])
    return Shape(name, T, B, I, H, **kw)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=list(DTYPES) + ["all"],
        help="one or more dtypes, or all (default: float32 on CPU; all on CUDA: float32 and bfloat16 "
        "everywhere, float16 on shapes with H, I multiples of 128 and B a multiple of 8 <= 128; "
        "all on CPU adds bfloat16 for fastrnns and batch-1; float64 only when named)",
    )
    p.add_argument("--mode", choices=["inference", "training", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="a few small shapes (a smoke run)")
    p.add_argument("--filter", help="only shapes whose name contains this substring")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="T,B,I,H[,OPTION...]",
                   help="run this shape instead of the grid (repeatable); options: layers=N, proj=P, "
                        "bidir, varlen, decode. Example: --shape 100,64,200,200 --shape 100,16,650,650,varlen")
    p.add_argument("--reps", type=int, help="timed blocks per implementation (default: fit --budget)")
    p.add_argument("--budget", type=float, help="seconds of timing per shape and mode (default 8 CPU, 2 CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both (CPU)")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="CUDA float32: default = torch's own flags, left as they are (torch 2.x: "
                        "cudnn.allow_tf32 on, so cuDNN's LSTM may use TF32; cuda.matmul.allow_tf32 off); "
                        "on/off set both flags, for both implementations")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device>-<date>/)")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replot", metavar="RESULTS_JSON", help=argparse.SUPPRESS)  # redraw speedup.png only
    # Debugging the script itself: measure another module's LSTM (e.g. torch.nn) instead of fastlstm.
    p.add_argument("--impl-module", default="fastlstm", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# The CPU features that decide which kernels run (torch's and fastlstm's) and so which host kind a
# result belongs to (AVX2-only hosts have no native bfloat16: torch's bf16 is slow there).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_host_info(impl):
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    loader = getattr(impl, "_loader", None)
    isa = loader.cpu_isa() if loader is not None and hasattr(loader, "cpu_isa") else None
    return {
        "cpu_flags": {k: k in flags for k in CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fastlstm_cpu_isa": isa,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        plot(os.path.join(os.path.dirname(args.replot), "speedup.png"), doc, doc["rows"], doc["geomean_speedup"])
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    # Whether either implementation may round float32 matmuls to TF32 (loosens the correctness check).
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32

    grid = QUICK_GRID if args.quick else (GPU_GRID if device.type == "cuda" else CPU_GRID)
    if args.shape:
        grid = args.shape
    if args.filter:
        grid = [s for s in grid if args.filter in s.name]
    items = plan(grid, args.dtype, device)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    if args.list:
        for shape, dtype in items:
            flags = " ".join(k for k in ("bidirectional", "variable_length", "decode") if getattr(shape, k))
            print(
                f"{shape.name:22s} {dtype:9s} T={shape.T} B={shape.B} I={shape.I} H={shape.H}"
                + (f" P={shape.P}" if shape.P else "")
                + f" layers={shape.layers} {flags}"
            )
        return
    if not items:
        sys.exit("nothing to run (check --filter and --dtype)")

    impl = _common.load_impl(args.impl_module)
    env = _common.environment(device, impl)
    if device.type == "cpu":
        env.update(cpu_host_info(impl))
    env.update(
        tf32={
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        }
        if device.type == "cuda"
        else None,
        cudnn_benchmark=torch.backends.cudnn.benchmark if device.type == "cuda" else None,
        timing="median of alternating blocks; " + ("CUDA events" if device.type == "cuda" else "perf_counter"),
        modes=modes,
        quick=args.quick,
        load_average_before=os.getloadavg(),
    )
    out_dir = args.out or _common.default_out_dir(device)
    cfg = timing_config(device, args)
    print(
        f"fastlstm ({env['impl_module']}, backend {env['fastlstm_backend']}) vs torch.nn.LSTM on {env['device']}"
        + (f", {env['cpu']}, {env['threads']} threads" if device.type == "cpu" else f", TF32 {args.tf32} (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
           f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32})")
        + f"; torch {env['torch']}; {len(items)} shape/dtype pairs x {len(modes)} modes",
        flush=True,
    )
    if device.type == "cpu":
        flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["cpu_flags"].items())
        print(f"CPU flags: {flags}; torch CPU capability {env['torch_cpu_capability']}; "
              f"fastlstm CPU kernels {env['fastlstm_cpu_isa']}", flush=True)
    if device.type == "cpu":
        alloc = env["allocator"]
        print("allocator: " + (" ".join(f"{k}={v}" for k, v in alloc.items()) if alloc else "C library defaults")
              + "; 'torch flt' / 'fast flt': minor page faults per call", flush=True)
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f} before starting: other processes share the CPU")
    if env["fastlstm_backend"] == "reference":
        print("warning: fastlstm has no compiled ops for this device; timing its plain-PyTorch fallback")

    from tqdm import tqdm

    rows = []
    t_start = time.perf_counter()
    try:
        with tqdm(items, unit="shape", dynamic_ncols=True) as bar:
            for shape, dtype in bar:
                bar.set_postfix_str(f"{shape.name} {dtype}")
                new = measure(impl, shape, dtype, modes, device, cfg, tf32)
                for r in new:
                    if r["status"] != "ok":
                        tqdm.write(f"{r['status'].upper()}: {shape.name} {dtype} {r['mode']}: {r['error']}")
                rows.extend(new)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far")
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    env["load_average_after"] = os.getloadavg()

    geo = summaries(rows)
    print()
    print(table(rows, device))
    print()
    for key, g in geo.items():
        print(f"geometric mean speedup, {key}: " + (f"{g:.3f}x" if g else "-"))
    noisy = [r for r in rows if max(r.get("baseline_iqr_pct") or 0, r.get("fastlstm_iqr_pct") or 0) > 25]
    if noisy:
        print(
            f"{len(noisy)} rows have an interquartile range above 25% of the median (iqr%): "
            "the machine was busy; rerun those with --filter on a quiet machine"
        )
    write_results(out_dir, env, rows, geo)
    if not args.no_plot and rows:
        plot(os.path.join(out_dir, "speedup.png"), env, rows, geo)
    print(f"\n{len(rows)} rows in {env['seconds']:.0f} s; wrote {out_dir}/results.{{csv,json}}, speedup.png")


if __name__ == "__main__":
    main()

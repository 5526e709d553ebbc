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

The shapes and what is run on them: lstm_cases.py; the correctness rule: lstm_check.py (the test
suite's); the timing loop: timing.py; host facts, tables, files and the plot: report.py.
"""
import argparse
import json
import os
import sys
import time

import torch

import report
import timing
from lstm_cases import (
    CPU_GRID, DTYPES, GPU_GRID, MODES, QUICK_GRID, Inputs, build_models, gate_flops, parse_shape, plan, reference_fn,
    run_forward, run_training, step_fn,
)  # fmt: skip
from lstm_check import check


def timing_config(device, args):
    """timing.budgeted's settings for this device and the command line."""
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
            t = timing.budgeted({"baseline": step_fn(base, inp, mode), "fastlstm": step_fn(fast, inp, mode)}, device, cfg)
        except Exception as e:  # noqa: BLE001 - recorded in the row and printed
            row.update(error_fields("error", f"{type(e).__name__}: {e}"))
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        mode_flops = flops * (3 if mode == "training" else 1)
        base_s, fast_s = t["baseline"].median, t["fastlstm"].median
        row.update(
            status="ok",
            baseline_ms=base_s * 1e3,
            fastlstm_ms=fast_s * 1e3,
            speedup=base_s / fast_s,
            baseline_ms_min=t["baseline"].min * 1e3,
            fastlstm_ms_min=t["fastlstm"].min * 1e3,
            baseline_iqr_pct=t["baseline"].iqr_pct,
            fastlstm_iqr_pct=t["fastlstm"].iqr_pct,
            reps=len(t["baseline"].seconds),
            calls_per_rep={"baseline": t["baseline"].calls, "fastlstm": t["fastlstm"].calls},
            gate_flops=mode_flops,
            fastlstm_tflops=mode_flops / fast_s / 1e12,
            baseline_tflops=mode_flops / base_s / 1e12,
            baseline_faults=t["baseline"].faults_median,
            fastlstm_faults=t["fastlstm"].faults_median,
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
    # CPU: minor page faults per call of each (timing.time_block), the usual reason torch's time on
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
    return report.format_table(header, lines, left={0, 8, 9})


def summaries(rows):
    """Geometric mean speedup per mode, and per mode and dtype when there are several dtypes."""
    result = {}
    dtypes = sorted({r["dtype"] for r in rows})
    for mode in MODES:
        picked = [r for r in rows if r["mode"] == mode]
        if not picked:
            continue
        result[mode] = timing.geomean([r.get("speedup") for r in picked])
        if len(dtypes) > 1:
            for d in dtypes:
                result[f"{mode} {d}"] = timing.geomean([r.get("speedup") for r in picked if r["dtype"] == d])
    return result


CSV_FIELDS = [
    "name", "T", "B", "I", "H", "proj_size", "layers", "bidirectional", "variable_length", "dtype", "mode",
    "baseline_ms", "fastlstm_ms", "speedup", "device", "status", "match", "match_rule", "tokens", "gate_flops",
    "baseline_tflops", "fastlstm_tflops", "baseline_ms_min", "fastlstm_ms_min", "baseline_iqr_pct",
    "fastlstm_iqr_pct", "reps", "baseline_faults", "fastlstm_faults", "error",
]  # fmt: skip



def write_results(out_dir, env, rows, geo):
    report.write_json(os.path.join(out_dir, "results.json"), env, rows, geomean_speedup=geo)
    report.write_csv(os.path.join(out_dir, "results.csv"), rows, CSV_FIELDS)


# ---------------------------------------------------------------------------------------------------


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


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        plot = os.path.join(os.path.dirname(args.replot), "speedup.png")
        report.plot_speedups(plot, doc, doc["rows"], doc["geomean_speedup"], MODES)
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

    impl = report.load_impl(args.impl_module)
    env = report.environment(device, impl)
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
    out_dir = args.out or report.default_out_dir(device)
    cfg = timing_config(device, args)
    print(
        f"fastlstm ({env['impl_module']}, backend {env['fastlstm_backend']}) vs torch.nn.LSTM on {env['device']}"
        + (f", {env['cpu']}, {env['threads']} threads" if device.type == "cpu" else f", TF32 {args.tf32} (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
           f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32})")
        + f"; torch {env['torch']}; {len(items)} shape/dtype pairs x {len(modes)} modes",
        flush=True,
    )
    if device.type == "cpu":
        cpu_line, alloc_line = report.host_lines(env)
        print(cpu_line, flush=True)
        print(alloc_line + "; 'torch flt' / 'fast flt': minor page faults per call", flush=True)
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
        report.plot_speedups(os.path.join(out_dir, "speedup.png"), env, rows, geo, MODES)
    print(f"\n{len(rows)} rows in {env['seconds']:.0f} s; wrote {out_dir}/results.{{csv,json}}, speedup.png")


if __name__ == "__main__":
    main()

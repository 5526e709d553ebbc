"""fastlstm.LSTMCell against torch.nn.LSTMCell on the CPU: a decoder loop of `--steps` chained
steps, for inference (no_grad) and training (the steps, then backward), at batch 1-64 and
H 128-1024 (input size = H).

The two are measured interleaved in the same run (rounds alternate which goes first) and the table
shows the median over rounds of torch's time / fastlstm's time, so > 1 means fastlstm is faster;
on a shared, noisy machine the per-round ratio is steadier than either time. `min/min` is the
ratio of each one's fastest round, the least disturbed by other load.

    PYTHONPATH=$PWD python benchmarks/bench_cell.py [--threads N] [--clock process] [--quick]
        [--json out.json]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import timing  # noqa: E402


def decoder(cell, x, h, c, steps, train):
    if train:
        out = []
        for _ in range(steps):
            h, c = cell(x, (h, c))
            out.append(h)
        torch.stack(out).sum().backward()
    else:
        with torch.no_grad():
            for _ in range(steps):
                h, c = cell(x, (h, c))


def measure(B, H, train, steps, rounds, dtype, impl, clock):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(H, H, dtype=dtype)
    fast = impl.LSTMCell(H, H, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, H, dtype=dtype, requires_grad=train)
    h0, c0 = torch.zeros(B, H, dtype=dtype), torch.zeros(B, H, dtype=dtype)
    fns = {"torch": lambda: decoder(ref, x, h0, c0, steps, train),
           "fastlstm": lambda: decoder(fast, x, h0, c0, steps, train)}
    for fn in fns.values():
        timing.warm_up(fn, clock=clock)
    # The same number of calls per block for both, enough for about 20 ms of torch's work.
    calls = timing.calls_per_block(timing.time_block(fns["torch"], 2, clock=clock), 0.02)
    t = timing.interleaved(fns, rounds, calls, clock=clock)
    ratios = [a / b for a, b in zip(t["torch"].seconds, t["fastlstm"].seconds)]
    return {
        "B": B, "H": H, "mode": "train" if train else "inference", "steps": steps,
        "torch_us_per_step": 1e6 * t["torch"].median / steps,
        "fastlstm_us_per_step": 1e6 * t["fastlstm"].median / steps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_of_min_times": t["torch"].min / t["fastlstm"].min,
    }


# mode, B, H, torch us/step, fastlstm us/step, ratio (min-max), min/min
WIDTHS = [9, 4, 5, 14, 17, 22, 8]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="process: this process's CPU time, which time spent descheduled by other "
                        "load does not count (meaningful with --threads 1)")
    p.add_argument("--quick", action="store_true", help="fewer rounds (5)")
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args()
    impl = report.load_impl()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = timing.CLOCKS[args.clock]
    dtype = getattr(torch, args.dtype)
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.steps} chained steps, {rounds} interleaved rounds, {args.clock} clock; "
          "ratio = torch / fastlstm")
    print(report.table_row(["mode", "B", "H", "torch us/step", "fastlstm us/step", "ratio (min-max)", "min/min"],
                           WIDTHS, sep=" "))
    rows = []
    for train in (False, True):
        for B in args.batches:
            for H in args.hidden:
                r = measure(B, H, train, args.steps, rounds, dtype, impl, clock)
                rows.append(r)
                cells = [r["mode"], B, H, f"{r['torch_us_per_step']:.1f}", f"{r['fastlstm_us_per_step']:.1f}",
                         f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                         f"{r['ratio_of_min_times']:.2f}"]
                print(report.table_row(cells, WIDTHS, sep=" "), flush=True)
    if args.json:
        env = report.environment(torch.device("cpu"), impl)
        report.write_json(args.json, env, rows, dtype=args.dtype, clock=args.clock)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

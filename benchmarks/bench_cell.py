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
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, load_impl  # noqa: E402


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


CLOCK = time.perf_counter


def time_once(fn, reps):
    start = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - start) / reps


def measure(B, H, train, steps, rounds, dtype, impl):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(H, H, dtype=dtype)
    fast = impl.LSTMCell(H, H, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, H, dtype=dtype, requires_grad=train)
    h0, c0 = torch.zeros(B, H, dtype=dtype), torch.zeros(B, H, dtype=dtype)
    fns = {"torch": lambda: decoder(ref, x, h0, c0, steps, train),
           "fastlstm": lambda: decoder(fast, x, h0, c0, steps, train)}
    # Enough repetitions per round for about 20 ms of work.
    for fn in fns.values():
        fn()
    reps = max(1, int(0.02 / max(time_once(fns["torch"], 2), 1e-6)))
    ratios, times = [], {"torch": [], "fastlstm": []}
    for r in range(rounds):
        order = ("torch", "fastlstm") if r % 2 == 0 else ("fastlstm", "torch")
        t = {name: time_once(fns[name], reps) for name in order}
        ratios.append(t["torch"] / t["fastlstm"])
        for name in t:
            times[name].append(t[name])
    return {
        "B": B, "H": H, "mode": "train" if train else "inference", "steps": steps,
        "torch_us_per_step": 1e6 * statistics.median(times["torch"]) / steps,
        "fastlstm_us_per_step": 1e6 * statistics.median(times["fastlstm"]) / steps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_of_min_times": min(times["torch"]) / min(times["fastlstm"]),
    }


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
    impl = load_impl()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.steps} chained steps, {rounds} interleaved rounds, {args.clock} clock; "
          "ratio = torch / fastlstm")
    print(f"{'mode':>9} {'B':>4} {'H':>5} {'torch us/step':>14} {'fastlstm us/step':>17} "
          f"{'ratio (min-max)':>22} {'min/min':>8}")
    rows = []
    for train in (False, True):
        for B in args.batches:
            for H in args.hidden:
                r = measure(B, H, train, args.steps, rounds, dtype, impl)
                rows.append(r)
                print(f"{r['mode']:>9} {B:>4} {H:>5} {r['torch_us_per_step']:>14.1f} "
                      f"{r['fastlstm_us_per_step']:>17.1f} {r['ratio_median']:>8.2f} "
                      f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
                      f"{r['ratio_of_min_times']:>8.2f}",
                      flush=True)
    if args.json:
        env = environment(torch.device("cpu"), impl)
        with open(args.json, "w") as f:
            json.dump({**env, "dtype": args.dtype, "clock": args.clock, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

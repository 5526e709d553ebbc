"""Same-process A/B timing of this checkout's ops against another commit's (tools/ab_build.sh).

    bash tools/ab_build.sh REV avx512,avx2          # once: build/ab/<hash>/fastlstm/
    PYTHONPATH=$PWD python tools/ab_time.py build/ab/<hash> [--rounds 7] [--quick]

Both libraries are loaded into one process (the other commit's ops as torch.ops.fastlstm_base),
with the same CPU instruction set (fastlstm's loader choice, FASTLSTM_CPU_ISA caps it), and each
case alternates the two (order swapped every round). Printed per case: medians in ms and
new / base (below 1: this checkout is faster). The cases are one layer (a multi-layer model is
the same call repeated), the LSTMCell step, float32, bfloat16 and float64, inference and
training (forward + backward through the op's autograd).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastlstm
from fastlstm import _loader

# name, T, B, I, H, dtype, options
LAYER = [
    ("fastrnns", 100, 64, 512, 512, torch.float32, {}),
    ("batch1-h128", 100, 1, 128, 128, torch.float32, {}),
    ("batch1-h512", 100, 1, 512, 512, torch.float32, {}),
    ("seq1000", 1000, 8, 128, 128, torch.float32, {}),
    ("b16-h256", 100, 16, 256, 256, torch.float32, {}),
    ("b16-h256-reverse", 100, 16, 256, 256, torch.float32, dict(reverse=True)),
    ("h128", 100, 64, 128, 128, torch.float32, {}),
    ("h1024", 100, 16, 1024, 1024, torch.float32, {}),
    ("varlen", 100, 64, 256, 256, torch.float32, dict(lengths=True)),
    ("proj", 50, 16, 256, 256, torch.float32, dict(proj=128)),
    ("decode-h512", 1, 16, 512, 512, torch.float32, dict(calls=20)),
    ("bf16-fastrnns", 100, 64, 512, 512, torch.bfloat16, {}),
    ("bf16-batch1-h512", 100, 1, 512, 512, torch.bfloat16, {}),
    ("bf16-h200", 100, 64, 200, 200, torch.bfloat16, {}),
    ("f64-b16-h256", 50, 16, 256, 256, torch.float64, {}),
    ("f64-b64-h512", 50, 64, 512, 512, torch.float64, {}),
]
CELL = [(1, 256), (1, 1024), (64, 256), (64, 1024)]
QUICK = {"fastrnns", "batch1-h128", "varlen", "proj", "decode-h512", "bf16-h200", "f64-b16-h256"}


def load_base(path: str, isa: str) -> None:
    for name in ("_C", f"_cpu_{isa}"):
        torch.ops.load_library(os.path.join(path, "fastlstm", f"{name}.abi3.so"))


def layer_args(T, B, I, H, dtype, opts, grad):
    g = torch.Generator().manual_seed(0)
    P = opts.get("proj", H)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype).requires_grad_(grad)

    lengths = None
    if opts.get("lengths"):
        lengths = torch.sort(torch.randint(T // 4, T + 1, (B,), generator=g), descending=True)[0]
        lengths[0] = T
    return (r(T, B, I), r(B, P), r(B, H), r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H),
            r(P, H) if "proj" in opts else None, lengths, opts.get("reverse", False))


def layer_fn(ns, case, training):
    _, T, B, I, H, dtype, opts = case
    op = getattr(torch.ops, ns).lstm_layer_forward
    args = layer_args(T, B, I, H, dtype, opts, training)
    calls = opts.get("calls", 1)
    if not training:
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    op(*args)
        return run
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        out = op(*args)
        torch.autograd.grad(out[0].sum() + out[1].sum() + out[2].sum(), leaves)
    return run


def cell_fn(ns, B, H, training):
    op = getattr(torch.ops, ns).lstm_cell_forward
    g = torch.Generator().manual_seed(0)
    args = [(torch.randn(*s, generator=g) * 0.1).requires_grad_(training)
            for s in ((B, H), (B, H), (B, H), (4 * H, H), (4 * H, H), (4 * H,), (4 * H,))]
    if not training:
        def run():
            with torch.no_grad():
                op(*args)
        return run

    def run():
        h, c, _ = op(*args)
        torch.autograd.grad(h.sum() + c.sum(), args)
    return run


def time_pair(fns, rounds, budget):
    """Medians (s) of each of the two callables, alternating, order swapped every round."""
    for f in fns:
        f()  # warm-up (packing caches, block cache, OpenMP team)
    t0 = time.perf_counter()
    fns[0]()
    once = time.perf_counter() - t0
    reps = max(1, min(50, int(budget / max(once, 1e-6) / (2 * rounds))))
    samples = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            samples[k].append((time.perf_counter() - t0) / reps)
    return [statistics.median(s) for s in samples]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="build/ab/<hash> from tools/ab_build.sh")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per case and mode, about")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="run only the cases with these names")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = _loader.cpu_isa()
    load_base(args.base, isa)
    print(f"isa {isa}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, base {args.base}")
    print(f"{'case':<22}{'mode':<10}{'new ms':>9}{'base ms':>9}{'new/base':>10}")
    ratios = []
    for case in LAYER:
        if (args.quick and case[0] not in QUICK) or (args.only and case[0] not in args.only):
            continue
        for training in (False, True):
            new, base = time_pair([layer_fn("fastlstm", case, training),
                                   layer_fn("fastlstm_base", case, training)], args.rounds, args.budget)
            ratios.append(new / base)
            print(f"{case[0]:<22}{'training' if training else 'inference':<10}{new * 1e3:9.3f}"
                  f"{base * 1e3:9.3f}{new / base:10.3f}", flush=True)
    for B, H in CELL:
        if (args.quick and (B, H) != (1, 256)) or (args.only and f"cell-b{B}-h{H}" not in args.only):
            continue
        for training in (False, True):
            new, base = time_pair([cell_fn("fastlstm", B, H, training),
                                   cell_fn("fastlstm_base", B, H, training)], args.rounds, args.budget)
            ratios.append(new / base)
            print(f"{f'cell-b{B}-h{H}':<22}{'training' if training else 'inference':<10}"
                  f"{new * 1e3:9.3f}{base * 1e3:9.3f}{new / base:10.3f}", flush=True)
    geo = statistics.geometric_mean(ratios)
    print(f"geomean new/base {geo:.3f} over {len(ratios)} rows; min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()

"""The timing loop of every benchmark CLI (bench_lstm.py, bench_cell.py, bench_onnx.py,
bench_variants.py).

Implementations are warmed up, then timed in interleaved blocks: one block of each per round, the
order reversed every other round (a b, b a, a b, ...), so that machine noise hits all of them. A
block is `calls` back-to-back calls; its time per call is one sample. On CUDA a block is timed with
CUDA events; on the CPU with a host clock (wall or process time), and each block also records the
minor page faults per call (memory the allocator had to map afresh: glibc's malloc hands large
freed blocks back to the kernel, and torch's large CPU workspaces fault in a page per 4 KiB)."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

CPU = torch.device("cpu")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def minor_faults():
    """Minor page faults of this process so far (0 where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_block(fn, number, device=CPU, clock=time.perf_counter, faults=None):
    """Seconds per call of `number` back-to-back calls (CUDA events on a GPU, `clock` on the CPU).
    On the CPU, when `faults` is a list, appends the block's minor page faults per call."""
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
    t0 = clock()
    for _ in range(number):
        fn()
    seconds = (clock() - t0) / number
    if faults is not None:
        faults.append((minor_faults() - f0) / number)
    return seconds


def warm_up(fn, device=CPU, min_calls=1, min_seconds=0.0, clock=time.perf_counter):
    """Calls fn until both minimums are met; returns the last call's seconds."""
    calls, t_start = 0, time.perf_counter()
    while True:
        t = time_block(fn, 1, device, clock)
        calls += 1
        if calls >= min_calls and time.perf_counter() - t_start >= min_seconds:
            return t


def calls_per_block(seconds_per_call, min_block_s):
    """Calls a block needs to last at least min_block_s (clock resolution, per-block overhead)."""
    return max(1, math.ceil(min_block_s / max(seconds_per_call, 1e-9)))


@dataclasses.dataclass
class Samples:
    """One implementation's blocks: seconds per call of each, and (CPU) page faults per call."""

    calls: int
    seconds: list = dataclasses.field(default_factory=list)
    faults: list = dataclasses.field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.seconds)

    @property
    def min(self):
        return min(self.seconds)

    @property
    def iqr_pct(self):
        return iqr_pct(self.seconds)

    @property
    def faults_median(self):
        return statistics.median(self.faults) if self.faults else None


def interleaved(fns, rounds, calls, device=CPU, clock=time.perf_counter, deadline=None, min_rounds=0):
    """Times every function of `fns` ({name: fn}) for `rounds` rounds, one block of calls[name]
    calls (or `calls`, one number for all) each per round, in the dict's order in even rounds and
    the reverse in odd ones. Stops early, after min_rounds, once time.perf_counter() passes
    `deadline` (a busy machine must not stretch a run). Returns {name: Samples}."""
    samples = {name: Samples(calls[name] if isinstance(calls, dict) else calls) for name in fns}
    names = list(fns)
    for r in range(rounds):
        if deadline is not None and r >= min_rounds and time.perf_counter() > deadline:
            break
        for name in names if r % 2 == 0 else reversed(names):
            s = samples[name]
            s.seconds.append(time_block(fns[name], s.calls, device, clock, s.faults))
    return samples


def budgeted(fns, device, cfg):
    """bench_lstm.py's policy: each function warmed up (cfg warmup_calls and warmup_s), blocks of
    at least min_block_s, and as many rounds as fit budget_s, within [min_reps, max_reps] (exactly
    `reps` when given; past twice the budget only min_reps). Returns {name: Samples}."""
    calls = {}
    per_round = 0.0
    for name, fn in fns.items():
        t = warm_up(fn, device, cfg["warmup_calls"], cfg["warmup_s"])
        calls[name] = calls_per_block(t, cfg["min_block_s"])
        per_round += calls[name] * t
    if cfg["reps"]:
        return interleaved(fns, cfg["reps"], calls, device)
    rounds = int(min(cfg["max_reps"], max(cfg["min_reps"], cfg["budget_s"] // max(per_round, 1e-9))))
    deadline = time.perf_counter() + 2 * cfg["budget_s"]
    return interleaved(fns, rounds, calls, device, deadline=deadline, min_rounds=cfg["min_reps"])


def iqr_pct(times):
    """Interquartile range as a percentage of the median (None under 4 samples)."""
    if len(times) < 4:
        return None
    q = statistics.quantiles(times, n=4)
    return 100 * (q[2] - q[0]) / statistics.median(times)


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None

"""Mutation check for the CUDA emulator: plants known bugs in a copy of csrc/kernels, one at a time,
builds each copy under the emulator (unoptimised; with AddressSanitizer + UndefinedBehaviorSanitizer
for the out-of-bounds bugs), and runs the checks of tests/test_emulator.py that should catch it.
Exits non-zero if the unmutated kernels fail those checks or if any planted bug goes uncaught.

    python tests/emu/mutate.py            # all mutants
    python tests/emu/mutate.py NAME ...   # some of them

Run by .ci/run. Each mutant costs one build and a few small cases (10-35 s each on two busy cores)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

import torch  # noqa: E402

import emulator  # noqa: E402
import test_emulator as te  # noqa: E402



@dataclass
class Mutant:
    name: str
    what: str
    file: str
    old: str
    new: str
    checks: list  # (description, function(exe)) run until one raises
    variant: str = "O0"  # the emulator build (tests/emu/emulator.py, VARIANTS)


def values(dtype, tile, lengths, proj, reverse=False):
    def run(exe):
        case = te.Case(dtype, tile, lengths, proj, reverse)
        te.check_forward(case, exe, True)
        te.check_backward(case, exe)
    return (f"values vs the CPU op ({te._id(dtype)}, {tile}-row tile)", run)


def orders(dtype, tile, lengths, proj, reverse=False):
    return (f"bitwise across thread/block orders ({te._id(dtype)}, {tile}-row tile)",
            lambda exe: te.check_orders(te.Case(dtype, tile, lengths, proj, reverse), exe))


MUTANTS = [
    Mutant("oob-global-read", "reads one batch row past the end of the matmul input",
           "lstm_device.cuh",
           "a_s[r][kk] = (b < B && k < K) ? a[static_cast<int64_t>(b) * K + k] : tzero;",
           "a_s[r][kk] = (b <= B && k < K) ? a[static_cast<int64_t>(b) * K + k] : tzero;",
           # P = 13: the scalar loads; the row past the batch is never used, so only ASan sees it.
           [values(torch.float32, 8, True, True)], "asan"),
    Mutant("oob-shared", "reads one row past the end of a shared-memory array",
           "lstm_device.cuh",
           "const Acc a1 = to_acc(a_s[row[1]][kk]);",
           "const Acc a1 = to_acc(a_s[row[1] + 1][kk]);",
           [values(torch.float32, 8, False, False)], "asan"),
    Mutant("missing-barrier-after-load", "computes before the block has loaded the tile",
           "lstm_device.cuh",
           "    }\n    __syncthreads();\n\n    if constexpr (kMma) {",
           "    }\n\n    if constexpr (kMma) {",
           [orders(torch.float32, 16, True, True), values(torch.float32, 16, True, True)]),
    Mutant("missing-barrier-before-reload", "loads the next K tile while others still compute",
           "lstm_device.cuh",
           "      }\n    }\n    __syncthreads();\n  }\n",
           "      }\n    }\n  }\n",
           [orders(torch.float32, 16, True, True), values(torch.float32, 16, True, True)]),
    Mutant("divergent-barrier", "__syncthreads inside a branch on the thread's K slice",
           "lstm_device.cuh",
           "    }\n    __syncthreads();\n\n    if constexpr (kMma) {",
           "    }\n    if (slice == 0) __syncthreads();\n\n    if constexpr (kMma) {",
           [values(torch.float32, 8, False, False)]),
    Mutant("wrong-mma-fragment", "loads the A fragment's third register from the wrong k",
           "lstm_device.cuh",
           "af[2] = load_pair(&w_s[g * kTileN + gid][kk + 8]);",
           "af[2] = load_pair(&w_s[g * kTileN + gid][kk]);",
           [values(torch.bfloat16, 8, False, False)]),
    Mutant("inter-block-race", "the forward step writes h into the buffer other blocks still read",
           "lstm_host.h",
           "h[k % 2], h[(k + 1) % 2]",
           "h[k % 2], h[k % 2]",
           [orders(torch.float32, 8, False, False), values(torch.float32, 8, False, False)]),
]


def run_checks(m: Mutant, exe: Path):
    """The first check that fails, as (description, message), or None."""
    for desc, check in m.checks:
        try:
            check(exe)
        except (AssertionError, emulator.EmulatorError) as e:
            return desc, str(e).strip().splitlines()
    return None


def main(names):
    selected = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    torch.set_num_threads(1)
    kernels = emulator.kernels_dir()
    start = time.time()
    print("baseline: the unmutated kernels pass every check", flush=True)
    for m in selected:
        failed = run_checks(m, emulator.build(m.variant))
        if failed:
            sys.exit(f"the unmutated kernels fail the checks for {m.name}: {failed}")
    print(f"  all checks pass ({time.time() - start:.0f} s)", flush=True)

    missed = []
    for m in selected:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "kernels"
            shutil.copytree(kernels, copy)
            src = (copy / m.file).read_text()
            if src.count(m.old) != 1:
                sys.exit(f"{m.name}: the text to mutate occurs {src.count(m.old)} times in {m.file} "
                         "(update tests/emu/mutate.py to the kernels' current source)")
            (copy / m.file).write_text(src.replace(m.old, m.new))
            os.environ["FASTLSTM_EMU_KERNELS"] = str(copy)
            exe = None
            try:
                exe = emulator.build(m.variant)
                failed = run_checks(m, exe)
            finally:
                del os.environ["FASTLSTM_EMU_KERNELS"]
                if exe is not None:
                    exe.unlink()  # mutant builds are never reused: keep the cache small
        took = time.time() - t0
        if failed:
            desc, lines = failed
            sig = next((ln for ln in lines if "error" in ln.lower() or "differs" in ln
                        or "AddressSanitizer" in ln or "runtime error" in ln), lines[0])
            print(f"caught  {m.name:30s} ({m.what}) by {desc} ({took:.0f} s)\n"
                  f"        {sig.strip()[:200]}", flush=True)
        else:
            print(f"MISSED  {m.name:30s} ({m.what}) ({took:.0f} s)", flush=True)
            missed.append(m.name)
    print(f"{len(selected) - len(missed)}/{len(selected)} planted bugs caught in "
          f"{time.time() - start:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

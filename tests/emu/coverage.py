"""Which paths of the CUDA kernels the emulator tests run: builds the emulator with gcov
instrumentation (unoptimised), runs every case of tests/test_emulator.py through it, and reports for
every instantiation of every kernel and device function in csrc/kernels
  - lines never run and branches never taken (gcov), less the few the layer code cannot reach
    (UNREACHABLE below, each with its reason);
  - block_matmul instantiations that never ran more than one K tile in a call;
  - kernels never launched with several blocks along x and along y, and the smallest and largest
    grids of the grid-stride kernel (one block; the 1024-block cap with a second pass).
Exits non-zero if any of these is missing.

    python tests/emu/coverage.py            # the sm80 build (tensor cores for 16-bit types)
    python tests/emu/coverage.py --fma      # the FMA build: block_matmul's 16-bit
                                            # instantiations for the 8- and 16-row tiles (the
                                            # only code that differs from sm80; test_fma_*)
    python tests/emu/coverage.py --old      # only the cases that predate the path cases

Takes a few minutes on two cores; not part of CI (the cases it runs are)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

import torch  # noqa: E402

import emulator  # noqa: E402
import test_emulator as te  # noqa: E402

# (function regex, source text on the line, reason): branches the layer code (lstm_host.h) never
# takes, so no shape can reach them.
UNREACHABLE = [
    (r"lstm_(forward|backward)_step<", "if (B == 0) return cudaSuccess;",
     "the layer code returns before any step when B == 0"),
    (r"lstm_forward_step<", "if ((gates_t == nullptr) != (cells_t == nullptr))",
     "the layer code passes both or neither"),
    (r"lstm_recurrent_inputs<", "if (n == 0) return cudaSuccess;",
     "the layer's backward needs T, B > 0"),
    (r"", "if (err != cudaSuccess",
     "launches of valid configurations do not fail"),
    (r"", "if (err != cudaSuccess) return err;", "launches of valid configurations do not fail"),
    (r"block_matmul<[^,]+, \d, 32,|_kernel<[^,]+, 32,", "return",
     "with 32 batch rows every thread holds final sums (no split over K)"),
    (r"_kernel<[^,]+, 32,", "if (!owner) return;",
     "with 32 batch rows every thread holds final sums (no split over K)"),
    (r"_kernel<[^,]+, 32,", "if (!block_matmul<",
     "with 32 batch rows every thread holds final sums (no split over K)"),
    (r"lstm_backward_cell_kernel<[^,]+, \d+, true, true>",
     "const bool next_active = dG_next != nullptr",
     "with projection the cell kernel gets no dG_next (the recurrent kernel takes dh)"),
]


def gcov_functions(objdir: Path):
    """{(file, function): {line: (count, [branch counts])}} over every object, merged (inline
    functions are emitted in several objects; the linker keeps one copy's counters)."""
    out = defaultdict(lambda: defaultdict(lambda: [0, None]))
    names = {}
    for obj in sorted(objdir.glob("*.o")):
        res = subprocess.run(["gcov", "-b", "-c", "--json-format", "-t", obj.name], cwd=objdir,
                             capture_output=True, text=True)
        if res.returncode != 0 or not res.stdout.strip():
            continue
        for f in json.loads(res.stdout)["files"]:
            path = os.path.relpath(f["file"], objdir) if os.path.isabs(f["file"]) else f["file"]
            if not path.startswith("kernels/"):
                continue
            for fn in f["functions"]:
                names[fn["name"]] = fn["demangled_name"]
            for ln in f["lines"]:
                rec = out[(path, ln.get("function_name", ""))][ln["line_number"]]
                rec[0] += ln["count"]
                br = [b["count"] for b in ln["branches"] if not b["throw"]]
                rec[1] = br if rec[1] is None else [a + b for a, b in zip(rec[1], br)]
    return out, names


def short(name: str) -> str:
    name = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", ""))
    return name.replace("fastlstm::cuda::", "").replace("detail::", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fma", action="store_true", help="the build without tensor cores")
    ap.add_argument("--old", action="store_true", help="only the cases that predate PATH_CASES")
    ap.add_argument("--keep", metavar="DIR", help="build and count in DIR (kept); with --report, "
                    "only report what an earlier run there counted")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    flags = emulator.COMMON + ["-O0", "--coverage"] + ([] if args.fma else ["-D__CUDA_ARCH__=800"])
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        objdir = tmp / "obj"
        log = tmp / "launches"
        exe = objdir / "driver"
        if not args.report:
            objdir.mkdir(parents=True)
            exe = emulator.compile_into(objdir, flags)
            os.environ["FASTLSTM_EMU_LAUNCH_LOG"] = str(log)
            cases = te.coverage_cases(fma=args.fma, old=args.old)
            print(f"built in {time.time() - start:.0f} s; running {len(cases)} cases", flush=True)
            for desc, run in cases:
                run(exe)
            print(f"ran in {time.time() - start:.0f} s", flush=True)
        lines, names = gcov_functions(objdir)
        syms = {}
        nm = subprocess.run(["nm", "-C", "--defined-only", str(exe)], capture_output=True, text=True)
        for row in nm.stdout.splitlines():
            parts = row.split(" ", 2)
            if len(parts) == 3:
                syms[int(parts[0], 16)] = parts[2]
        launches = defaultdict(list)
        for row in log.read_text().splitlines():
            off, x, y, z = row.split()
            launches[short(syms.get(int(off, 16), off))].append((int(x), int(y), int(z)))
        source = {}
        for p in emulator.kernels_dir().iterdir():
            source["kernels/" + p.name] = p.read_text().splitlines()

    def in_scope(name):
        # The FMA build differs from sm80 in block_matmul's 16-bit instantiations only (UsesMma);
        # its tests run the 8- and 16-row tiles.
        return not args.fma or re.match(r"bool block_matmul<(__half|__nv_bfloat16), \d, (8|16),",
                                        name) is not None

    problems = []
    executed = 0
    for (path, fn), recs in sorted(lines.items(), key=lambda kv: names.get(kv[0][1], kv[0][1])):
        demangled = names.get(fn, fn)
        if not in_scope(short(demangled)):
            continue
        if not any(c for c, _ in recs.values()):
            continue  # never called: reported below through the launch log and the K tiles
        executed += 1
        for line, (count, branches) in sorted(recs.items()):
            text = source[path][line - 1].strip()
            missed = [i for i, b in enumerate(branches or []) if b == 0]
            if count and not missed:
                continue
            why = next((r for f, t, r in UNREACHABLE if text.startswith(t) and re.search(f, short(demangled))),
                       None)
            if why:
                continue
            what = "never runs" if not count else f"branches {missed} of {len(branches)} never taken"
            problems.append(f"{short(demangled)}: {path}:{line} {what}: {text[:80]}")
        # K tiles: the barrier after each tile's loads runs once a tile per thread, the first
        # statement once a call per thread; more of the former means a call with several tiles.
        if short(demangled).startswith("block_matmul<"):
            first = next(c for ln, (c, _) in sorted(recs.items())
                         if "const int tid = threadIdx.x;" in source[path][ln - 1])
            tiles = next(c for ln, (c, _) in sorted(recs.items())
                         if source[path][ln - 1].strip() == "__syncthreads();" and
                         "if constexpr (kMma)" in "".join(source[path][ln:ln + 2]))
            if tiles <= first:
                problems.append(f"{short(demangled)}: no call ran more than one K tile")

    print(f"{executed} instantiations of kernel and device functions ran")
    for name, grids in sorted(launches.items()):
        if not in_scope(name):
            continue
        xs, ys = [g[0] for g in grids], [g[1] for g in grids]
        if "recurrent_inputs" in name:
            summary = f"{len(grids)} launches, grid {min(xs)}..{max(xs)} blocks"
            if min(xs) > 1 or max(xs) < 1024:
                problems.append(f"{name}: never one block, or never the 1024-block cap ({summary})")
        else:
            summary = (f"{len(grids)} launches, x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)}, "
                       f"both > 1 in {sum(1 for x, y, _ in grids if x > 1 and y > 1)}")
            # The 8-row batch tile is only chosen for B <= 8: one block along x.
            if ", 8," in name:
                if max(ys) < 2:
                    problems.append(f"{name}: never several blocks along y ({summary})")
            elif not any(x > 1 and y > 1 for x, y, _ in grids):
                problems.append(f"{name}: never several blocks along both x and y ({summary})")
        print(f"  {name}: {summary}")
    print(f"{len(launches)} kernel instantiations launched")
    kernels = set(n for n in map(short, syms.values()) if re.match(r"void lstm_\w+_kernel<", n))
    for name in sorted(kernels):
        if in_scope(name) and name not in launches:
            problems.append(f"{name}: never launched")
    for p in problems:
        print("NOT COVERED", p)
    print(f"{len(problems)} paths not covered ({time.time() - start:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

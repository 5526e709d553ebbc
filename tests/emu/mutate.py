"""Mutation check for the CUDA emulator: plants known bugs in a copy of csrc/kernels, one at a time,
builds each copy under the emulator (unoptimised; with AddressSanitizer + UndefinedBehaviorSanitizer
for the out-of-bounds bugs), and runs the checks of tests/test_emulator.py that should catch it.
Exits non-zero if the unmutated kernels fail those checks or if any planted bug goes uncaught.

    python tests/emu/mutate.py            # all mutants
    python tests/emu/mutate.py NAME ...   # some of them

Run by .ci/run. Each mutant costs one build (of the files it changes) and a few small cases."""
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
import test_emulator_variants as tv  # noqa: E402



@dataclass
class Mutant:
    name: str
    what: str
    file: str
    old: str
    new: str
    checks: list  # (description, function(exe)) run until one raises
    variant: str = "O0"  # the emulator build (tests/emu/emulator.py, VARIANTS)


def _flags(lengths, proj, reverse=False):
    return (f"{'lengths' if lengths else 'full'}, {'proj' if proj else 'noproj'}"
            + (", reverse" if reverse else ""))


# A check is (description, function(exe)); the description names every argument (the baseline runs
# each distinct one once).
def values(dtype, tile, lengths, proj, reverse=False):
    def run(exe):
        case = te.Case(dtype, tile, lengths, proj, reverse)
        te.check_forward(case, exe, True)
        te.check_backward(case, exe)
    return (f"values vs the CPU op ({te._id(dtype)}, {tile}-row tile, "
            f"{_flags(lengths, proj, reverse)})", run)


def orders(dtype, tile, lengths, proj, reverse=False):
    return (f"bitwise across thread/block orders ({te._id(dtype)}, {tile}-row tile, "
            f"{_flags(lengths, proj, reverse)})",
            lambda exe: te.check_orders(te.Case(dtype, tile, lengths, proj, reverse), exe))


def path(dtype, name, lengths, proj):
    """One of test_emulator.PATH_CASES: values vs the CPU op, then the rounding contract."""
    return (f"values and rounding, {name} ({te._id(dtype)}, {_flags(lengths, proj)})",
            lambda exe: te.check_case(te.path_case(dtype, name, lengths, proj), exe))


def variant(dtype, ln, clip, zone, proj, lengths, reverse, dims=(4, 5, 7, 20, 13)):
    """A case of tests/test_emulator_variants.py: the variant layer's forward step by step and its
    backward against the float64 reference."""
    return (f"variant values ({te._id(dtype)}, {'ln' if ln else 'noln'}, "
            f"{'clip' if clip else 'noclip'}, {zone}, {_flags(lengths, proj, reverse)}, {dims})",
            lambda exe: tv.check_case(tv.VCase(dtype, ln, clip, zone, proj, lengths, reverse, dims),
                                      exe))


def variant_orders(dtype, dims):
    def run(exe):
        case = tv.VCase(dtype, True, True, "cmask", True, True, True, dims)
        fwd = case.emu_forward(exe)
        for env in tv.ORDERS:
            got = case.emu_forward(exe, env=env)
            for name in fwd:
                assert torch.equal(fwd[name].view(torch.uint8), got[name].view(torch.uint8)), \
                    f"{name} differs between thread/block orders"
    return f"variant bitwise across thread/block orders ({te._id(dtype)}, {dims})", run


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
    # 16-bit precision: the values checks above compare with the CPU op within a multiple of its
    # own error and pass all of these; the rounding contract (tests/emu/rounding.py) does not.
    Mutant("cell-state-16bit", "keeps the cell state in the 16-bit input type",
           "lstm_forward.cu",
           "const Acc cn = f * c_state[bj] + i * g;",
           "const Acc cn = to_acc(from_acc<T>(f * c_state[bj] + i * g));",
           [path(torch.float16, "b7-h72-p56", True, True)]),
    Mutant("matmul-sum-16bit", "keeps the tensor-core product's running sum in 16 bits",
           "lstm_device.cuh",
           "mma_16816<T>(dm[g], af, bf);",
           "mma_16816<T>(dm[g], af, bf);\n"
           "          for (int e = 0; e < 4; ++e) dm[g][e] = to_acc(from_acc<T>(dm[g][e]));",
           [path(torch.float16, "b7-h72-p56", False, False)]),
    Mutant("bfloat16-truncation", "converts to bfloat16 by truncation, not to nearest even",
           "lstm_device.cuh",
           "return __float2bfloat16_rn(x);",
           "return __float2bfloat16_rz(x);",
           [path(torch.bfloat16, "b7-h72-p56", True, True)]),
    Mutant("preactivation-16bit", "rounds the forget gate's pre-activation to 16 bits",
           "lstm_forward.cu",
           "const Acc f = sigmoid(acc[1][c][r] + to_acc(xg[bg + H]));",
           "const Acc f = sigmoid(to_acc(from_acc<T>(acc[1][c][r] + to_acc(xg[bg + H]))));",
           [path(torch.float16, "b7-h72-p56", False, True)]),
    Mutant("cell-update-16bit-gates", "updates c from the gates rounded to 16 bits",
           "lstm_forward.cu",
           "const Acc cn = f * c_state[bj] + i * g;",
           "const Acc cn = to_acc(from_acc<T>(f)) * c_state[bj] + "
           "to_acc(from_acc<T>(i)) * to_acc(from_acc<T>(g));",
           [path(torch.bfloat16, "b7-h72-p56", False, False)]),
    Mutant("dc-carried-16bit", "carries the backward's dc between steps in 16 bits",
           "lstm_backward.cu",
           "dc_state[bj] = dc * f;",
           "dc_state[bj] = to_acc(from_acc<T>(dc * f));",
           [path(torch.float16, "b7-h72-p56", True, False)]),
    # Shapes: only the path cases (test_emulator.PATHS) reach these.
    Mutant("grid-rounded-down", "sizes the grid-stride kernel's grid rounding down",
           "lstm_backward.cu",
           "std::min<int64_t>((n + kThreads - 1) / kThreads, 1024)",
           "std::min<int64_t>(n / kThreads, 1024)",
           [path(torch.float32, "b1-h17-p9", False, False)]),
    Mutant("column-grid-off-by-one", "rounds the forward's column-block count up from 2 past a tile",
           "lstm_forward.cu",
           "const dim3 grid(blocks_for(B, kBB), blocks_for(H, kTileN));",
           "const dim3 grid(blocks_for(B, kBB), (H + kTileN - 2) / kTileN);",
           [path(torch.float32, "b1-h17-p9", True, False)]),
    Mutant("vector-load-unaligned", "takes 16-byte loads whenever the row length allows, aligned "
           "or not", "lstm_launch.cuh",
           "return aligned16(p) && ld % TileK<T>::kVec == 0;",
           "return ld % TileK<T>::kVec == 0;",
           [path(torch.float32, "b7-h72-p56-misaligned", False, False)], "asan"),
    Mutant("batch-tile-hardcoded", "places the forward's row blocks 32 rows apart whatever the tile",
           "lstm_forward.cu",
           "const int b0 = blockIdx.x * kBB, n0 = blockIdx.y * kTileN;\n  Acc acc[4][2][2];",
           "const int b0 = blockIdx.x * 32, n0 = blockIdx.y * kTileN;\n  Acc acc[4][2][2];",
           [path(torch.float32, "b33-h37-p21", False, False)]),
    Mutant("k-edge-in-tile", "bounds the scalar loads by the index within the K tile",
           "lstm_device.cuh",
           "a_s[r][kk] = (b < B && k < K) ? a[static_cast<int64_t>(b) * K + k] : tzero;",
           "a_s[r][kk] = (b < B && kk < K) ? a[static_cast<int64_t>(b) * K + k] : tzero;",
           [path(torch.float32, "b33-h37-p21", False, False)]),
    # The variant layer (lstm_variant.cu).
    Mutant("variant-block-sum-race", "drops the barrier between the levels of the block reduction",
           "lstm_variant.cu",
           "      for (int n = 0; n < kN; ++n) red[n][tid] += red[n][tid + s];\n    }\n    __syncthreads();",
           "      for (int n = 0; n < kN; ++n) red[n][tid] += red[n][tid + s];\n    }",
           [variant_orders(torch.float32, (2, 3, 5, 150, 131))]),
    Mutant("variant-ln-mean", "divides the gates' layer-norm sum by H instead of 4H",
           "lstm_variant.cu", "mean_x = v[0] / Acc(H4);", "mean_x = v[0] / Acc(H);",
           [variant(torch.float32, True, False, "nozone", False, False, False)]),
    Mutant("variant-ln-backward", "leaves the x-hat term out of the layer norm's backward",
           "lstm_variant.cu", " - s[7 * H + n] * uxx);", ");",
           [variant(torch.float32, True, False, "nozone", False, False, False)]),
    Mutant("variant-clip-grad", "lets the gradient through where the cell was clipped",
           "lstm_variant.cu", "c_raw <= p.clip)) dct = Acc(0);", "c_raw <= p.clip)) dct = dct;",
           [variant(torch.float64, False, True, "nozone", False, False, False)]),
    Mutant("variant-zoneout-dc", "drops the part of dc that zoneout keeps for c_{t-1}",
           "lstm_variant.cu", "keep = mc * dc;", "keep = Acc(0);",
           [variant(torch.float64, False, False, "masks", False, False, False)]),
    Mutant("variant-zoneout-h-mask", "mixes h with c's zoneout mask", "lstm_variant.cu",
           "h = zone_mix(zone_at(p.zh, bH + j), p.h_prev[bH + j], mm);",
           "h = zone_mix(zone_at(p.zc, bH + j), p.h_prev[bH + j], mm);",
           [variant(torch.float32, False, False, "masks", False, False, False)]),
    Mutant("variant-inactive-steps", "runs the cell for sequences past their length",
           "lstm_variant.cu", "  if (!active_row(p.lengths, p.t, b)) {\n    for (int64_t n = tid; n < K;",
           "  if (p.t < 0 && !active_row(p.lengths, p.t, b)) {\n    for (int64_t n = tid; n < K;",
           [variant(torch.float32, False, False, "nozone", False, True, False)]),
    Mutant("variant-inactive-dh", "drops the recurrent gradient at steps past a sequence's length "
           "(projection)", "lstm_variant.cu",
           "    } else if (dh_rec != nullptr) {\n      dh_keep[bP + j] += dh_rec[bP + j];",
           "    } else if (dh_rec != nullptr) {\n      dh_keep[bP + j] += Acc(0);",
           [variant(torch.float64, False, False, "nozone", True, True, True)]),
    Mutant("variant-c-16bit", "carries c rounded to the input dtype", "lstm_variant.cu",
           "    p.c_state[bH + j] = c_t;", "    p.c_state[bH + j] = to_acc(from_acc<T>(c_t));",
           [variant(torch.bfloat16, False, False, "nozone", False, False, False)]),
    Mutant("variant-h-unrounded", "carries h without rounding it to the input dtype",
           "lstm_variant.cu", "      p.h_next[bH + j] = to_acc(hr);", "      p.h_next[bH + j] = h;",
           [variant(torch.float16, False, False, "nozone", False, False, False)]),
    Mutant("variant-dc-16bit", "carries the backward's dc rounded to the input dtype",
           "lstm_variant.cu", "p.dc_state[bH + j] = keep + dct * f;",
           "p.dc_state[bH + j] = to_acc(from_acc<T>(keep + dct * f));",
           [variant(torch.bfloat16, False, False, "nozone", False, False, False)]),
    Mutant("variant-padding-read", "passes the input's padding (past a sequence's length) to the "
           "weight gradient's product", "lstm_variant.cu",
           "out[i] = active ? to_acc(x[i]) : AccT<T>(0);", "out[i] = to_acc(x[i]) + AccT<T>(0 * active);",
           [("variant: NaN in the padding changes nothing", tv.test_variant_nan_padding)]),
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
    # Compiled units shared by the builds of this run: a mutant recompiles only what it changes.
    objects = Path(tempfile.mkdtemp(prefix="fastlstm-mutate-"))
    try:
        return _main(selected, kernels, start, objects)
    finally:
        shutil.rmtree(objects, ignore_errors=True)


def _main(selected, kernels, start, objects):
    print("baseline: the unmutated kernels pass every check", flush=True)
    done = set()
    for m in selected:
        exe = emulator.build(m.variant, objects)
        for desc, check in m.checks:
            if (m.variant, desc) in done:  # several mutants share a check
                continue
            done.add((m.variant, desc))
            try:
                check(exe)
            except (AssertionError, emulator.EmulatorError) as e:
                sys.exit(f"the unmutated kernels fail the check for {m.name}, {desc}: {e}")
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
                exe = emulator.build(m.variant, objects)
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

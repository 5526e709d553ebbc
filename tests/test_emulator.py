"""The CUDA kernels and the CUDA layer code (csrc/kernels), compiled as host C++ and run on the CPU by
the emulator in tests/emu, against the CPU op (torch.ops.fastlstm.*) built from this checkout.

Every kernel instantiation runs: each dtype, batch tile (8, 16, 32 rows), with and without lengths,
with and without projection, training and inference forward, and the backward; both directions.
A set of odd shapes (PATHS) runs every branch, tile edge, grid size, load width and K range of every
instantiation (tests/emu/coverage.py shows it), and those cases also check each step against a
float64 reference that rounds exactly where the layer contract rounds (tests/emu/rounding.py).
Results must not depend on the order in which threads and blocks run between barriers (bitwise), a
smaller set runs under AddressSanitizer and UndefinedBehaviorSanitizer with exact-size buffers, and
tests/emu/mutate.py shows that planted kernel bugs make these tests fail. What the emulator cannot
show is in docs/cuda.md ("Running the CUDA kernels without a GPU")."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastlstm  # noqa: F401  (registers torch.ops.fastlstm)

sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
import emulator  # noqa: E402
import rounding  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulator.CXX) is None,
                                reason=f"no C++ compiler ({emulator.CXX}) to build the emulator")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CELL = {torch.float64: torch.float64, torch.float32: torch.float32,
        torch.float16: torch.float32, torch.bfloat16: torch.float32}
# Per batch tile: (B, H, P with projection). The kernels pick the tile from B and H
# (csrc/kernels/lstm_launch.cuh): B <= 8 -> 8; B <= 16, or fewer than 128 blocks of 32 rows -> 16;
# else 32. H = 20 and P = 13 take the scalar (not 16-byte) loads for 16-bit types.
TILES = {8: (5, 20, 13), 16: (13, 40, 16), 32: (4097, 16, 8)}
T_STEPS = {8: 4, 16: 3, 32: 2}
I_SIZE = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are small: with the CPU's threads busy running the emulator and other tests,
    # OpenMP's spin-waits cost more than they save.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def sm80():
    return emulator.build("sm80")


def _id(v):
    return str(v).replace("torch.", "")


class Case:
    """One layer's inputs in float64 (rounded through `dtype`), the CPU op's results in `dtype` and
    in float64 on the same rounded inputs (the reference for 16-bit types)."""

    def __init__(self, dtype, tile, lengths, proj, reverse, seed=0, dims=None, misalign=0):
        if dims is None:
            B, H, P = TILES[tile]
            P = P if proj else H
            T, I = T_STEPS[tile], I_SIZE
        else:
            T, B, I, H, P = dims
            P = P if proj else H
        self.dtype, self.reverse, self.misalign = dtype, reverse, misalign
        self.T, self.B, self.I, self.H, self.P, self.proj = T, B, I, H, P, proj
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0):
            t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
            return t.to(dtype).to(torch.float64)

        k = 2.0 / H ** 0.5
        self.x64 = {
            "x": r(T, B, I, scale=2.0), "h0": r(B, P), "c0": r(B, H),
            "w_ih": r(4 * H, I, scale=k), "w_hh": r(4 * H, P, scale=k),
            "b_ih": r(4 * H, scale=k), "b_hh": r(4 * H, scale=k),
            "w_hr": r(P, H, scale=k) if proj else None,
        }
        self.lengths = None
        if lengths:
            ln = torch.randint(0, T + 1, (B,), generator=g)
            ln[0], ln[-1] = 0, T
            self.lengths = ln

    def inputs(self, dtype):
        return {k: None if v is None else v.to(dtype) for k, v in self.x64.items()}

    def cpu_forward(self, dtype, training=True):
        a = self.inputs(dtype)
        return torch.ops.fastlstm.lstm_layer_forward(
            a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
            self.lengths, self.reverse, training)

    def sizes(self, training, max_xg=0):
        return {"sizes": torch.tensor([self.T, self.B, self.I, self.H, self.P]),
                "flags": torch.tensor([int(self.reverse), int(training),
                                       emulator.DTYPE_CODE[self.dtype], max_xg]),
                "misalign": torch.tensor([self.misalign]) if self.misalign else None}

    def emu_forward(self, exe, training, env=None, max_xg=0):
        a = self.inputs(self.dtype)
        tensors = dict(self.sizes(training, max_xg), x=a["x"], h0=a["h0"], c0=a["c0"],
                       w_ih=a["w_ih"], w_hh=a["w_hh"], bias=a["b_ih"] + a["b_hh"], w_hr=a["w_hr"],
                       lengths=self.lengths)
        T, B, H, P, dt = self.T, self.B, self.H, self.P, self.dtype
        shapes = {"output": ((T, B, P), dt), "h_n": ((B, P), dt), "c_n": ((B, H), dt),
                  "c_n_acc": ((B, H), CELL[dt]), "buffers": ((8,), torch.int64)}
        if training:
            shapes.update(gates=((T, B, 4 * H), dt), cells=((T, B, H), CELL[dt]),
                          xg=((T, B, 4 * H), dt))
            if self.proj:
                shapes.update(hidden=((T, B, H), dt))
        return emulator.run(exe, "forward", tensors, shapes, env)

    def grads(self):
        g = torch.Generator().manual_seed(1)
        T, B, H, P = self.T, self.B, self.H, self.P
        return [torch.randn(*s, generator=g, dtype=torch.float64).to(self.dtype).to(torch.float64)
                for s in [(T, B, P), (B, P), (B, H)]]

    def backward_args(self, dtype, saved):
        """Arguments of lstm_layer_backward in `dtype`, with the saved tensors of the CPU forward in
        self.dtype (upcast for the float64 reference)."""
        a = self.inputs(dtype)
        go, ghn, gcn = (t.to(dtype) for t in self.grads())
        output, _, _, gates, cells, hidden = saved
        cell = CELL[dtype]
        return (go, ghn, gcn, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["w_hr"],
                self.lengths, output.to(dtype), gates.to(dtype), cells.to(cell), hidden.to(dtype),
                self.reverse)

    def emu_backward(self, exe, saved, env=None):
        a = self.inputs(self.dtype)
        go, ghn, gcn = (t.to(self.dtype) for t in self.grads())
        output, _, _, gates, cells, hidden = saved
        tensors = dict(self.sizes(True), grad_output=go, grad_h_n=ghn, grad_c_n=gcn, x=a["x"],
                       h0=a["h0"], c0=a["c0"], w_ih=a["w_ih"], w_hh=a["w_hh"], w_hr=a["w_hr"],
                       lengths=self.lengths, output=output, gates=gates, cells=cells,
                       hidden=hidden if self.proj else None)
        T, B, I, H, P, dt = self.T, self.B, self.I, self.H, self.P, self.dtype
        shapes = {"grad_input": ((T, B, I), dt), "grad_h0": ((B, P), dt), "grad_c0": ((B, H), dt),
                  "grad_w_ih": ((4 * H, I), dt), "grad_w_hh": ((4 * H, P), dt),
                  "grad_bias": ((4 * H,), dt), "dG": ((T, B, 4 * H), dt),
                  "dh_all": ((T, B, P) if self.proj else (0,), dt)}
        if self.proj:
            shapes["grad_w_hr"] = ((P, H), dt)
        return emulator.run(exe, "backward", tensors, shapes, env)


# Against the CPU op in the same dtype: float64 and float32 differ only in summation order, so the
# absolute tolerance scales with the tensor's largest element (weight gradients sum over T * B rows
# and cancel). For 16-bit types both sides round differently, so the emulated kernels' error against
# float64 must be at most 4x the CPU op's own (plus one epsilon of the dtype at the tensor's scale).
CLOSE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def assert_matches(name, emu, cpu, ref, dtype):
    assert emu.shape == cpu.shape, f"{name}: shape {tuple(emu.shape)} != {tuple(cpu.shape)}"
    if dtype in CLOSE:
        rtol, atol = CLOSE[dtype]
        scale = max(1.0, cpu.abs().max().item()) if cpu.numel() else 1.0
        torch.testing.assert_close(emu, cpu, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name}: {m}")
        return
    emu64 = emu.double()
    assert torch.isfinite(emu64).all(), f"{name}: non-finite values"
    e = (emu64 - ref).abs().max().item()
    c = (cpu.double() - ref).abs().max().item()
    bound = 4 * c + torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    assert e <= bound, \
        f"{name}: error {e:.3g} against float64, the CPU op's is {c:.3g} (bound {bound:.3g})"


FORWARD_NAMES = ["output", "h_n", "c_n", "gates", "cells", "hidden"]
BACKWARD_NAMES = ["grad_input", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_bias",
                  "grad_w_hr"]


def check_forward(case, exe, training, max_xg=0):
    max_xg = max_xg or 1 << 24
    got = case.emu_forward(exe, training, max_xg=max_xg)
    cpu = case.cpu_forward(case.dtype, training)
    ref = case.cpu_forward(torch.float64, training)
    for i, name in enumerate(FORWARD_NAMES):
        if name in got:
            assert_matches(name, got[name], cpu[i], ref[i], case.dtype)
    check_buffers(case, got["buffers"].tolist(), training, max_xg)


def check_buffers(case, buffers, training, max_xg):
    """What the layer code allocated (csrc/kernels/lstm_host.h, forward_buffers). The driver hands
    the kernels nullptr for every buffer of size 0, so a kernel that still wrote one would crash."""
    T, B, H, P = case.T, case.B, case.H, case.P
    xg, chunk, h_state, c_state, output, gates, cells, hidden = buffers
    assert (h_state, c_state, output) == (2 * B * P, B * H, T * B * P)
    if training:
        assert (chunk, xg, gates, cells) == (T, T * B * 4 * H, T * B * 4 * H, T * B * H)
        assert hidden == (T * B * H if case.proj else 0)
    else:
        # Nothing saved: no gates or cells, at most one step's hidden (scratch for the projection),
        # and the input projected a chunk of steps at a time.
        assert (gates, cells) == (0, 0)
        assert hidden == (B * H if case.proj else 0)
        assert chunk == max(1, min(T, max_xg // (B * 4 * H))) and xg == chunk * B * 4 * H


def check_backward(case, exe):
    saved = case.cpu_forward(case.dtype, True)
    got = case.emu_backward(exe, saved)
    cpu = torch.ops.fastlstm.lstm_layer_backward(*case.backward_args(case.dtype, saved))
    ref = torch.ops.fastlstm.lstm_layer_backward(*case.backward_args(torch.float64, saved))
    for i, name in enumerate(BACKWARD_NAMES):
        if name in got:
            assert_matches(name, got[name], cpu[i], ref[i], case.dtype)


# Margins of the rounding contract, from the 30 float16/bfloat16 PATH_CASES of the 8- and 16-row
# tiles on the sm80 build (allowed error: E, the bound on the float32 value before rounding, plus
# half an ulp of the dtype for rounded values). The kernels: no element off; cells at most 0.059x of
# E, rounded values at most 1.00x (rounding to nearest reaches half an ulp). Planted bugs
# (tests/emu/mutate.py), every case failing, by at least: c kept in 16 bits 35x (93% of cells
# off, worst 1260x); the mma sum kept in 16 bits 38x (97% of cells off); bfloat16 by truncation
# 1.99x (49% of gates and dG off, worst 2.0x); the forget gate's pre-activation in 16 bits 6.9x;
# c updated from 16-bit gates 42x; the backward's dc carried in 16 bits 4.2x (8% of dG off).
def check_case(case, exe, env=None, max_xg=0, rounding_must_hold=True):
    """One case end to end: the training and inference forward (the latter with the input projected
    max_xg elements at a time, and bitwise the training forward's output, h_n and c_n) and the
    backward on the emulated forward's saved tensors, against the CPU op on the same inputs, then
    step by step against the float64 reference of tests/emu/rounding.py, which rounds exactly where
    the layer contract rounds. Returns that comparison's rounding.Report (asserted clean unless
    rounding_must_hold is false)."""
    max_xg = max_xg or case.B * 4 * case.H
    fwd = case.emu_forward(exe, True, env=env)
    inf = case.emu_forward(exe, False, env=env, max_xg=max_xg)
    for name in ("output", "h_n", "c_n_acc"):
        assert torch.equal(inf[name].view(torch.uint8), fwd[name].view(torch.uint8)), \
            f"inference {name} differs from training's"
    check_buffers(case, fwd["buffers"].tolist(), True, 1 << 24)
    check_buffers(case, inf["buffers"].tolist(), False, max_xg)
    cpu, ref = case.cpu_forward(case.dtype, True), case.cpu_forward(torch.float64, True)
    for i, name in enumerate(FORWARD_NAMES):
        if name in fwd:
            assert_matches(name, fwd[name], cpu[i], ref[i], case.dtype)
    hidden = fwd["hidden"] if case.proj else torch.empty(0, dtype=case.dtype)
    saved = (fwd["output"], None, None, fwd["gates"], fwd["cells"], hidden)
    bwd = case.emu_backward(exe, saved, env=env)
    cpu = torch.ops.fastlstm.lstm_layer_backward(*case.backward_args(case.dtype, saved))
    ref = torch.ops.fastlstm.lstm_layer_backward(*case.backward_args(torch.float64, saved))
    for i, name in enumerate(BACKWARD_NAMES):
        if name in bwd:
            assert_matches(name, bwd[name], cpu[i], ref[i], case.dtype)

    f64 = lambda d: {k: v.double() for k, v in d.items()}  # noqa: E731
    acc = CELL[case.dtype]
    rep = rounding.Report(case.dtype)
    rounding.check_forward(rep, case.x64, f64(fwd), case.lengths, case.reverse, acc)
    go, ghn, gcn = case.grads()
    rounding.check_backward(rep, case.x64, f64(fwd),
                            {"grad_output": go, "grad_h_n": ghn, "grad_c_n": gcn}, f64(bwd),
                            case.lengths, case.reverse, acc)
    if rounding_must_hold:
        failures = rep.failures()
        assert not failures, "\n".join(failures)
    return rep


# Forward: every instantiation of the cell kernel <dtype, tile, lengths, projection, training> (and
# with it the projection kernel's); the direction alternates so that both meet every other choice.
# Inference cases project the input two steps at a time (the chunked input projection).
FORWARD_CASES = [
    pytest.param(dtype, tile, lengths, proj, training,
                 id=f"{_id(dtype)}-bb{tile}-{'lengths' if lengths else 'full'}-"
                    f"{'proj' if proj else 'noproj'}-{'train' if training else 'infer'}")
    for dtype in DTYPES for tile in (8, 16, 32) for lengths in (False, True)
    for proj in (False, True) for training in (True, False)
]


def run_forward_case(exe, dtype, tile, lengths, proj, training):
    case = Case(dtype, tile, lengths, proj, reverse=training != lengths)
    check_forward(case, exe, training, max_xg=0 if training else 2 * case.B * 4 * case.H)


@pytest.mark.parametrize("dtype, tile, lengths, proj, training", FORWARD_CASES)
def test_forward(sm80, dtype, tile, lengths, proj, training):
    run_forward_case(sm80, dtype, tile, lengths, proj, training)


# Backward: every instantiation of the backward kernels <dtype, tile, lengths, projection>, in both
# directions (one direction per instantiation for the 32-row tile, whose cases run 4097 sequences).
BACKWARD_CASES = [
    pytest.param(dtype, tile, lengths, proj, reverse,
                 id=f"{_id(dtype)}-bb{tile}-{'lengths' if lengths else 'full'}-"
                    f"{'proj' if proj else 'noproj'}-{'rev' if reverse else 'fwd'}")
    for dtype in DTYPES for tile in (8, 16, 32) for lengths in (False, True)
    for proj in (False, True) for reverse in (False, True)
    if tile != 32 or reverse != lengths
]


@pytest.mark.parametrize("dtype, tile, lengths, proj, reverse", BACKWARD_CASES)
def test_backward(sm80, dtype, tile, lengths, proj, reverse):
    check_backward(Case(dtype, tile, lengths, proj, reverse), sm80)


# ---- Shapes that reach every path of every kernel (tests/emu/coverage.py shows it). ----
# The cases above leave paths unrun: the 8-row tile never loads 16-bit rows 16 bytes at a time, the
# 16-row tile never runs several row blocks, the 32-row tile never a partial column block, the
# 16-bit forward never more than one 64-wide K tile, no input is misaligned, and no launch is small
# enough for a grid rounded down to be empty. These shapes come from the kernels' branch conditions
# (csrc/kernels/lstm_launch.cuh, lstm_device.cuh, lstm_forward.cu, lstm_backward.cu):
# - batch tile (with_config): B <= 8 -> 8 rows; B <= 16 or ceil(B/32) * ceil(H/16) < 128 -> 16;
#   else 32. B = 1, 7, 33 (3 blocks of 16, the last with 1 row) and 1345 (43 blocks of 32 with
#   H = 37 or 40: 129 blocks, the last with 1 row).
# - columns: 16 per block (hidden units H in the cell kernels, state units P in the projection and
#   the backward's recurrent kernel): H, P = 17 (a last block of 1 unit), 37, 40, 21, 23 partial.
# - 16-byte loads (vec_ok): a row length that is a multiple of 16 bytes and an aligned pointer; odd
#   lengths (17, 37, 21, 23) take the scalar loads in every dtype, 72, 56, 40, 24 the vector loads,
#   and "misaligned" starts every input one element past a 16-byte boundary.
# - K (the summed dimension: P in the forward cell, H in the projection, 4H or P in the backward):
#   below one 16-wide mma step (9), between steps (17, 21), over one tile (64 elements for 16-bit
#   types, 32 otherwise: 72, 37, 4H) with a partial last tile.
# - the backward's grid-stride kernel (lstm_recurrent_inputs): T * B * P < 128 (one block).
# Each runs with and without lengths and projection where that reaches more (combos), forward
# (training and inference) and backward, against the CPU op and the rounding contract.
BOTH = ((False, False), (True, True), (False, True), (True, False))
PATHS = {
    # name: (T, B, I, H, P with projection, misalign in elements, (lengths, proj) combos)
    "b1-h17-p9": (3, 1, 5, 17, 9, 0, BOTH),
    "b7-h72-p56": (2, 7, 7, 72, 56, 0, BOTH),
    "b7-h72-p56-misaligned": (2, 7, 7, 72, 56, 1, ((True, True), (False, False))),
    "b33-h37-p21": (2, 33, 6, 37, 21, 0, BOTH),
    "b33-h40-p20": (2, 33, 6, 40, 20, 0, ((False, True),)),
    "b1345-h37-p23": (2, 1345, 4, 37, 23, 0, BOTH),
    "b1345-h40-p24": (2, 1345, 4, 40, 24, 0, ((True, True),)),
}


def path_param(dtype, path, lengths, proj):
    return pytest.param(dtype, path, lengths, proj,
                        id=f"{_id(dtype)}-{path}-{'lengths' if lengths else 'full'}-"
                           f"{'proj' if proj else 'noproj'}")


PATH_CASES = [path_param(dtype, path, lengths, proj)
              for dtype in DTYPES for path, spec in PATHS.items() for lengths, proj in spec[-1]]


def path_case(dtype, path, lengths, proj):
    T, B, I, H, P, misalign, _ = PATHS[path]
    return Case(dtype, None, lengths, proj, reverse=lengths != proj, dims=(T, B, I, H, P),
                misalign=misalign)


@pytest.mark.parametrize("dtype, path, lengths, proj", PATH_CASES)
def test_paths(sm80, dtype, path, lengths, proj):
    check_case(path_case(dtype, path, lengths, proj), sm80)


def run_empty_case(exe, dtype, T, B, training):
    """No steps or no sequences: nothing runs, h_n is h0 and c_n is c0 (lstm_host.h)."""
    H, P, I = 5, 5, 3
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    h0, c0 = r(B, P), r(B, H)
    tensors = {"sizes": torch.tensor([T, B, I, H, P]),
               "flags": torch.tensor([0, int(training), emulator.DTYPE_CODE[dtype], 0]),
               "x": r(T, B, I), "h0": h0, "c0": c0, "w_ih": r(4 * H, I), "w_hh": r(4 * H, P),
               "bias": r(4 * H)}
    got = emulator.run(exe, "forward", tensors,
                       {"output": ((T, B, P), dtype), "h_n": ((B, P), dtype),
                        "c_n_acc": ((B, H), CELL[dtype]), "buffers": ((8,), torch.int64)})
    assert got["output"].numel() == 0
    assert torch.equal(got["h_n"], h0) and torch.equal(got["c_n_acc"], c0.to(CELL[dtype]))
    # Inference projects at least one step at a time, except when a step has nothing to project.
    want = T if training or B == 0 else max(1, T)
    assert got["buffers"][1].item() == want


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("T, B", [(0, 3), (2, 0)], ids=["T0", "B0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_empty(sm80, dtype, T, B, training):
    run_empty_case(sm80, dtype, T, B, training)


def coverage_cases(fma=False, old=False):
    """(description, function(exe)) for every case the tests run on the sm80 (or the FMA) build,
    for tests/emu/coverage.py; `old`: only those that predate PATH_CASES."""
    out = []
    if fma:
        for dtype in (torch.float16, torch.bfloat16):
            for tile in (8, 16):
                for proj in (False, True):
                    out.append((f"fma {dtype} {tile} {proj}",
                                lambda exe, a=(dtype, tile, proj): run_fma_case(exe, *a)))
        if not old:
            for p in FMA_PATH_CASES:
                out.append((f"fma paths {p.id}",
                            lambda exe, a=p.values: check_case(path_case(*a), exe)))
        return out
    for p in FORWARD_CASES:
        out.append((f"forward {p.id}", lambda exe, a=p.values: run_forward_case(exe, *a)))
    for p in BACKWARD_CASES:
        out.append((f"backward {p.id}", lambda exe, a=p.values: check_backward(Case(*a), exe)))
    if not old:
        for dtype in DTYPES:
            for T, B in ((0, 3), (2, 0)):
                for training in (True, False):
                    out.append((f"empty {dtype} {T} {B}",
                                lambda exe, a=(dtype, T, B, training): run_empty_case(exe, *a)))
        for p in PATH_CASES:
            out.append((f"paths {p.id}",
                        lambda exe, a=p.values: check_case(path_case(*a), exe)))
    return out


# ---- Results must not depend on scheduling: races show up as bitwise differences. ----
ORDERS = [
    {"FASTLSTM_EMU_THREAD_ORDER": "reverse", "FASTLSTM_EMU_BLOCK_ORDER": "reverse"},
    {"FASTLSTM_EMU_THREAD_ORDER": "shuffle", "FASTLSTM_EMU_BLOCK_ORDER": "shuffle",
     "FASTLSTM_EMU_SEED": "1"},
    {"FASTLSTM_EMU_THREAD_ORDER": "shuffle", "FASTLSTM_EMU_BLOCK_ORDER": "forward",
     "FASTLSTM_EMU_SEED": "2"},
]
ORDER_CASES = [
    pytest.param(torch.float64, 8, True, False, True, id="float64-bb8-lengths-noproj-rev"),
    pytest.param(torch.float32, 16, True, True, False, id="float32-bb16-lengths-proj-fwd"),
    pytest.param(torch.float16, 16, False, False, True, id="float16-bb16-full-noproj-rev"),
    pytest.param(torch.bfloat16, 8, True, True, False, id="bfloat16-bb8-lengths-proj-fwd"),
]


def _bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), \
            f"{name} differs between thread/block orders"


def check_orders(case, exe):
    saved = case.cpu_forward(case.dtype, True)
    fwd = case.emu_forward(exe, True)
    bwd = case.emu_backward(exe, saved)
    for env in ORDERS:
        _bitwise_equal(fwd, case.emu_forward(exe, True, env=env))
        _bitwise_equal(bwd, case.emu_backward(exe, saved, env=env))


@pytest.mark.parametrize("dtype, tile, lengths, proj, reverse", ORDER_CASES)
def test_thread_and_block_order_bitwise(sm80, dtype, tile, lengths, proj, reverse):
    check_orders(Case(dtype, tile, lengths, proj, reverse), sm80)


# Several row and column blocks of the 16-row tile, and 16-bit K over two tiles.
@pytest.mark.parametrize("dtype, path, lengths, proj", [
    path_param(torch.float32, "b33-h37-p21", True, True),
    path_param(torch.bfloat16, "b7-h72-p56", False, False),
])
def test_thread_and_block_order_bitwise_paths(sm80, dtype, path, lengths, proj):
    check_orders(path_case(dtype, path, lengths, proj), sm80)


# ---- The FMA path for 16-bit types (no tensor cores). ----
@pytest.fixture(scope="session")
def fma():
    return emulator.build("fma")


@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
@pytest.mark.parametrize("tile", [8, 16], ids=lambda t: f"bb{t}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_fma_path_16bit(fma, dtype, tile, proj):
    run_fma_case(fma, dtype, tile, proj)


def run_fma_case(exe, dtype, tile, proj):
    case = Case(dtype, tile, lengths=True, proj=proj, reverse=proj)
    check_forward(case, exe, True)
    check_backward(case, exe)


# The FMA build differs from sm80 in block_matmul only (the FMA loop instead of mma.sync): the path
# shapes of the 8- and 16-row tiles run every branch of its 16-bit instantiations there
# (tests/emu/coverage.py --fma).
FMA_PATH_CASES = [
    path_param(dtype, path, lengths, proj) for dtype in (torch.float16, torch.bfloat16)
    for path, lengths, proj in [("b1-h17-p9", True, True), ("b7-h72-p56", False, True),
                                ("b7-h72-p56-misaligned", True, True),
                                ("b33-h37-p21", True, True), ("b33-h40-p20", False, True)]
]


@pytest.mark.parametrize("dtype, path, lengths, proj", FMA_PATH_CASES)
def test_fma_paths(fma, dtype, path, lengths, proj):
    check_case(path_case(dtype, path, lengths, proj), fma)


# ---- AddressSanitizer + UndefinedBehaviorSanitizer, exact-size buffers and shared arrays. ----
@pytest.fixture(scope="session")
def asan():
    return emulator.build("asan")


ASAN_CASES = [
    pytest.param(dtype, tile, lengths, proj, id=f"{_id(dtype)}-bb{tile}-{lengths}-{proj}")
    for dtype, tile, lengths, proj in [
        (torch.float64, 8, True, True), (torch.float32, 16, False, True),
        (torch.float32, 8, True, False), (torch.float16, 16, True, True),
        (torch.bfloat16, 8, False, False), (torch.bfloat16, 16, True, True)]
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tile, lengths, proj", ASAN_CASES)
def test_sanitizers(asan, dtype, tile, lengths, proj):
    case = Case(dtype, tile, lengths, proj, reverse=lengths)
    check_forward(case, asan, True)
    check_forward(case, asan, False, max_xg=case.B * 4 * case.H)
    check_backward(case, asan)


# Misaligned inputs (UndefinedBehaviorSanitizer reports a misaligned 16-byte load) and the smallest
# launches.
@pytest.mark.slow
@pytest.mark.parametrize("dtype, path, lengths, proj", [
    path_param(torch.float16, "b7-h72-p56-misaligned", True, True),
    path_param(torch.float32, "b7-h72-p56-misaligned", False, False),
    path_param(torch.bfloat16, "b1-h17-p9", False, True),
])
def test_sanitizers_paths(asan, dtype, path, lengths, proj):
    check_case(path_case(dtype, path, lengths, proj), asan)


def test_emulator_selftest(sm80):
    """The parts of the emulator the LSTM kernels do not use yet: the grid barrier of a cooperative
    launch, warp shuffles, launch-configuration limits."""
    import subprocess
    proc = subprocess.run([str(sm80), "selftest"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout and proc.stdout.count("ok:") == 7, proc.stdout

"""CPU kernel selection: results that do not depend on the thread count, and (below) the run-time
choice of the instruction set."""
import pytest
import torch

import fastlstm
from helpers import make_input, run

# Each case takes a different path through the recurrent matmul (csrc/cpu/layer_plan.h: Recurrence).
THREAD_CASES = [
    dict(T=20, B=8, I=24, H=80),  # per-block panels of w_hh, the last block partial
    dict(T=3, B=8, I=24, H=150),  # few steps: w_hh read in place
    dict(T=20, B=2, I=24, H=70),  # dot products with w_hh's rows
    dict(T=20, B=6, I=16, H=40, proj_size=24),
    dict(T=20, B=5, I=16, H=96, bidirectional=True, num_layers=2, lengths=[20, 17, 9, 9, 3]),
    dict(T=40, B=48, I=64, H=160),  # steps big enough to be split among threads
]


def assert_same_with_1_2_3_threads(model, inp, hx, x):
    """Outputs, final states and every gradient, and the outputs of an inference call (which projects
    the input differently), are bitwise equal with 1, 2 and 3 threads."""
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, h, c, grads = run(model, inp, hx, [x])
            with torch.no_grad():
                out_i, (h_i, c_i) = model(inp, hx)
            results[threads] = [getattr(out, "data", out), h, c, *grads, getattr(out_i, "data", out_i), h_i, c_i]
    finally:
        torch.set_num_threads(before)
    names = (["output", "h_n", "c_n", "grad input"] + [f"grad {n}" for n, _ in model.named_parameters()]
             + ["inference output", "inference h_n", "inference c_n"])
    for threads in (2, 3):
        for name, a, b in zip(names, results[1], results[threads]):
            assert torch.equal(a, b), (
                f"{name}: {threads} threads differ from 1 by {(a - b).abs().max().item():.3g}")


@pytest.mark.parametrize("case", THREAD_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_float64_results_do_not_depend_on_thread_count(case):
    # torch.nn.LSTM gives bitwise the same float64 outputs and gradients with 1, 2 or 3 threads; so
    # must fastlstm (its blocks of hidden units are sized by H alone, never by the thread count).
    # float32: see the brgemm test below; without brgemm its GEMMs are MKL's (at::mm), whose float32
    # summation order may change with the threads.
    case = dict(case)
    T, B, I, H = (case.pop(k) for k in "TBIH")
    lengths = case.pop("lengths", None)
    model = fastlstm.LSTM(I, H, dtype=torch.float64, **case)
    inp, x = make_input(T, B, I, torch.float64, lengths=lengths)
    D = 2 if model.bidirectional else 1
    hx = (torch.randn(model.num_layers * D, B, model.proj_size or H, dtype=torch.float64),
          torch.randn(model.num_layers * D, B, H, dtype=torch.float64))
    assert_same_with_1_2_3_threads(model, inp, hx, x)


def _brgemm_float32():
    # fastlstm's large float32 GEMMs run on oneDNN's brgemm micro-kernel where oneDNN has one for the
    # CPU: AVX-512, and AVX2 (measured here with ONEDNN_MAX_CPU_ISA=AVX2: 115-130 GFLOP/s a core,
    # half the AVX-512 rate). Below AVX2 (older x86, other architectures), or with
    # FASTLSTM_CPU_GEMM=blas, the MKL/ATen path runs.
    import os
    import platform
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and fastlstm.backend("cpu") == "compiled"
            and not isa.startswith(("SSE", "AVX_")) and isa not in ("AVX",)
            and os.environ.get("FASTLSTM_CPU_GEMM") != "blas")


@pytest.mark.skipif(not _brgemm_float32(), reason="no oneDNN brgemm for this CPU (needs AVX2 or AVX-512)")
@pytest.mark.parametrize("case", THREAD_CASES + [
    dict(T=30, B=8, I=200, H=72, bidirectional=True, lengths=[30, 22, 22, 9, 5, 5, 2, 1]),
    dict(T=5, B=7, I=3000, H=100, proj_size=50, bidirectional=True)],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_float32_brgemm_results_do_not_depend_on_thread_count(case):
    # Every float32 GEMM (input projection from 64 rows, recurrence, projection to proj_size, dX,
    # dW_ih, dW_hh, dW_hr) runs on brgemm tiles fixed by the shape (NOTES.md entries 10, 12, 23, 24,
    # 37): float32 outputs and all gradients are then bitwise the same with 1, 2 or 3 threads, like
    # float64 above (torch.nn.LSTM's float32 output with proj_size is not).
    case = dict(case)
    T, B, I, H = (case.pop(k) for k in "TBIH")
    lengths = case.pop("lengths", None)
    model = fastlstm.LSTM(I, H, **case)
    inp, x = make_input(T, B, I, torch.float32, lengths=lengths)
    D = 2 if model.bidirectional else 1
    hx = (torch.randn(model.num_layers * D, B, model.proj_size or H),
          torch.randn(model.num_layers * D, B, H))
    assert_same_with_1_2_3_threads(model, inp, hx, x)


# ---------------------------------------------------------------------------------------------------
# Run-time choice of the CPU build (fastlstm/_loader.py): a build whose instructions the CPU lacks
# would crash the process with an illegal instruction, so it must never be chosen.

import os
import subprocess
import sys

from fastlstm import _loader

# What each build's compiler flags (setup.py) assume, written out here independently of the loader.
REQUIRED_FLAGS = {
    "generic": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
}
ZEN3_FLAGS = frozenset("sse4_2 avx avx2 fma f16c bmi2 aes".split())  # an AVX2-only host
ZEN4_FLAGS = ZEN3_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def proc_cpuinfo_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_chosen_build_runs_on_this_cpu_and_is_the_best_it_can():
    isa = _loader.cpu_isa()
    assert isa in REQUIRED_FLAGS, _loader.load_error()
    flags = proc_cpuinfo_flags()
    assert REQUIRED_FLAGS[isa] <= flags, f"{isa} chosen, but this CPU lacks {REQUIRED_FLAGS[isa] - flags}"
    # Not merely safe: the best build this CPU, torch and the environment allow is the one in use.
    capability = torch.backends.cpu.get_cpu_capability()
    requested = os.environ.get("FASTLSTM_CPU_ISA")
    best = "generic"
    if "avx2" in _loader.built_isas() and REQUIRED_FLAGS["avx2"] <= flags and capability in ("AVX2", "AVX512"):
        best = "avx2"
    if "avx512" in _loader.built_isas() and REQUIRED_FLAGS["avx512"] <= flags and capability == "AVX512":
        best = "avx512"
    if requested in REQUIRED_FLAGS and list(REQUIRED_FLAGS).index(requested) < list(REQUIRED_FLAGS).index(best):
        best = requested
    assert isa == best


@pytest.mark.parametrize("flags, capability, requested, built, expected", [
    (ZEN4_FLAGS, "AVX512", None, ["generic", "avx2", "avx512"], "avx512"),
    (ZEN4_FLAGS, "AVX512", "avx2", ["generic", "avx2", "avx512"], "avx2"),
    (ZEN4_FLAGS, "AVX512", "generic", ["generic", "avx2", "avx512"], "generic"),
    (ZEN4_FLAGS, "AVX2", None, ["generic", "avx2", "avx512"], "avx2"),  # ATEN_CPU_CAPABILITY=avx2
    (ZEN4_FLAGS, "AVX512", None, ["generic", "avx2"], "avx2"),  # built without AVX-512
    (ZEN3_FLAGS, "AVX2", None, ["generic", "avx2", "avx512"], "avx2"),
    (ZEN3_FLAGS, "AVX2", "avx512", ["generic", "avx2", "avx512"], "avx2"),  # asking cannot raise it
    (ZEN3_FLAGS, "AVX512", None, ["generic", "avx2", "avx512"], "avx2"),  # flags overrule torch
    (ZEN4_FLAGS - {"avx512bw"}, "AVX512", None, ["generic", "avx2", "avx512"], "avx2"),
    (frozenset({"sse4_2", "avx"}), "DEFAULT", None, ["generic", "avx2", "avx512"], "generic"),
    (frozenset({"sse4_2", "avx"}), "DEFAULT", None, ["avx2", "avx512"], None),  # reference runs
    (None, "AVX2", None, ["generic", "avx2", "avx512"], "avx2"),  # no /proc/cpuinfo: torch decides
    (None, "DEFAULT", None, ["generic", "avx2", "avx512"], "generic"),
])
def test_choose_isa_never_picks_instructions_the_cpu_lacks(flags, capability, requested, built, expected):
    chosen = _loader.choose_isa(flags, capability, requested, built)
    assert chosen == expected
    if chosen is not None and flags is not None:
        assert REQUIRED_FLAGS[chosen] <= flags


def test_non_x86_uses_only_the_generic_build():
    assert _loader.choose_isa(None, "DEFAULT", None, ["generic"], x86=False) == "generic"
    assert _loader.choose_isa(None, "AVX512", None, ["avx2", "avx512"], x86=False) is None


_FORCED_RUN = r"""
import sys, torch, fastlstm
from fastlstm import _loader
torch.manual_seed(0)
out = {"isa": _loader.cpu_isa()}
for dtype in (torch.float64, torch.float32):
    # Shapes that take the packed, in-place and dot-product paths, with a partial vector of units.
    for T, B, H in ((12, 8, 70), (3, 16, 40), (9, 1, 33)):
        m = fastlstm.LSTM(20, H, num_layers=2, dtype=dtype)
        x = torch.randn(T, B, 20, dtype=dtype, requires_grad=True)
        y, (h, c) = m(x)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum(),
                                [x, *m.parameters()])
        out[(str(dtype), T, B, H)] = [y.detach(), h.detach(), c.detach(), *g]
torch.save(out, sys.argv[1])
"""


def _forced_results(tmp_path, env_update):
    path = tmp_path / f"{abs(hash(tuple(sorted(env_update.items()))))}.pt"
    env = dict(os.environ, **env_update)
    result = subprocess.run([sys.executable, "-c", _FORCED_RUN, str(path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path)


def test_each_lower_build_can_be_forced_and_gives_the_same_results(tmp_path):
    built = _loader.built_isas()
    current = _loader.cpu_isa()
    lower = [isa for isa in built if list(REQUIRED_FLAGS).index(isa) <= list(REQUIRED_FLAGS).index(current)]
    assert "generic" in lower, f"the portable build is missing (built: {built})"
    base = _forced_results(tmp_path, {"FASTLSTM_CPU_ISA": current})
    assert base.pop("isa") == current
    for isa in lower:
        if isa == current:
            continue
        forced = _forced_results(tmp_path, {"FASTLSTM_CPU_ISA": isa})
        assert forced.pop("isa") == isa
        for key, tensors in base.items():
            # Different vector widths sum in a different order: float64 agrees to rounding, float32 to
            # a few ulps amplified by the recurrence.
            tol = dict(rtol=1e-10, atol=1e-12) if "float64" in key[0] else dict(rtol=2e-5, atol=2e-6)
            for a, b in zip(tensors, forced[key]):
                torch.testing.assert_close(b, a, **tol, msg=lambda m, k=key, i=isa: f"{i} vs {current}, {k}: {m}")


_PROJECTION_RUN = r"""
import sys, torch, fastlstm
torch.manual_seed(0)
torch.set_num_threads(2)  # the barrier loop needs two threads
out = {}
# Inference calls that take the per-block input projection and the loop with a barrier a step by
# default (csrc/cpu/layer_plan.h: block_proj, barrier): a partial last block,
# several tasks a step, bidirectional with lengths, bfloat16 (native where the CPU has avx512_bf16).
for dtype in (torch.float32, torch.bfloat16):
    for T, B, I, H, bidir in ((12, 8, 20, 70, False), (30, 16, 48, 200, True), (9, 64, 32, 128, False)):
        m = fastlstm.LSTM(I, H, bidirectional=bidir, dtype=dtype)
        x = torch.randn(T, B, I, dtype=dtype)
        lengths = torch.linspace(T, 1, B).round().long()
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        with torch.no_grad():
            y, (h, c) = m(x)
            yp, (hp, cp) = m(packed)
        out[(str(dtype), T, B, H)] = [y, h, c, yp.data, hp, cp]
torch.save(out, sys.argv[1])
"""


def test_block_projection_and_step_barrier_give_bitwise_the_same_results(tmp_path):
    # The default for these inference calls (each block projects its own input inside the step
    # loop; one parallel region with a barrier a step) against one projection GEMM for many steps
    # (FASTLSTM_CPU_PROJ=whole, which also takes the per-step parallel_for) and against the per-step
    # parallel_for alone (FASTLSTM_CPU_SYNC=fork): brgemm sums each product in the same order in all
    # three, so every output is bitwise the same. A wrong offset, or a step that reads h before
    # every block has written it, fails.
    results = {}
    for name, env_update in (("default", {}), ("whole", {"FASTLSTM_CPU_PROJ": "whole"}),
                             ("fork", {"FASTLSTM_CPU_SYNC": "fork"})):
        path = tmp_path / f"{name}.pt"
        env = dict(os.environ, **env_update)
        done = subprocess.run([sys.executable, "-c", _PROJECTION_RUN, str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = torch.load(path)
    base = results.pop("default")
    for other, res in results.items():
        assert base.keys() == res.keys()
        for key in base:
            for name, a, b in zip(["output", "h_n", "c_n", "packed output", "packed h_n", "packed c_n"],
                                  base[key], res[key]):
                assert torch.equal(a, b), (
                    f"{other} {key} {name}: differs by {(a.float() - b.float()).abs().max().item():.3g}")


def test_torch_capability_override_is_honoured(tmp_path):
    # ATEN_CPU_CAPABILITY=avx2 makes torch behave as on an AVX2-only host; fastlstm must follow.
    forced = _forced_results(tmp_path, {"ATEN_CPU_CAPABILITY": "avx2"})
    assert forced.pop("isa") in ("avx2", "generic")


# ---------------------------------------------------------------------------------------------------
# bfloat16: native bf16 matmuls on CPUs with avx512_bf16, float32 on converted copies elsewhere
# (FASTLSTM_CPU_BF16=float forces the latter). Both must stay within torch's own bf16 error.

@pytest.mark.parametrize("lengths, batch", [(None, 1), (None, 6), ("sorted", 6), ("unsorted", 6)])
def test_bfloat16_varlen_bidirectional_error_within_torch_error(lengths, batch):
    from torch.nn.utils.rnn import pack_padded_sequence
    T, I, H = 12, 16, 40
    lens = {None: None, "sorted": [12, 10, 7, 7, 3, 1], "unsorted": [7, 12, 1, 10, 3, 7]}[lengths]
    ref64 = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    fast = fastlstm.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.bfloat16)
    fast.load_state_dict(ref64.state_dict())
    torch_bf16 = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.bfloat16)
    torch_bf16.load_state_dict(ref64.state_dict())
    x = torch.randn(T, batch, I).to(torch.bfloat16)

    def run_model(model, dtype):
        xx = x.to(dtype).requires_grad_()
        inp = xx if lens is None else pack_padded_sequence(xx, torch.tensor(lens), enforce_sorted=lengths == "sorted")
        out, (h, c) = model(inp)
        data = out if lens is None else out.data
        w = torch.linspace(-1, 1, data.numel(), dtype=torch.float64).view_as(data).to(dtype)
        grads = torch.autograd.grad((data * w).sum() + h.sum() + c.sum(), [xx, *model.parameters()])
        return [t.double() for t in (data, h, c, *grads)]

    gold = run_model(ref64, torch.float64)
    ours = run_model(fast, torch.bfloat16)
    theirs = run_model(torch_bf16, torch.bfloat16)
    names = ["output", "h_n", "c_n", "grad input"] + [n for n, _ in ref64.named_parameters()]
    for name, g, o, t in zip(names, gold, ours, theirs):
        scale = max(1.0, g.abs().max().item())
        err_ours, err_theirs = (o - g).abs().max().item(), (t - g).abs().max().item()
        assert err_ours <= 2 * err_theirs + 2 ** -8 * scale, (name, err_ours, err_theirs)

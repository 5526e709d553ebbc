"""Property tests: random configurations of fastlstm.LSTM against torch.nn.LSTM with the same
state_dict. Outputs, final states and every gradient (input, h0, c0, each parameter) must agree.

Profiles (FASTLSTM_HYPOTHESIS_PROFILE, default "ci"):
  ci      200 examples, derandomized: every CI run checks the same configurations
  manual  2000 examples, random: a longer hunt, run by hand
The profile is applied to these tests only, so that loading it does not change the settings of
hypothesis tests elsewhere in the session.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "manual", max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(os.environ.get("FASTLSTM_HYPOTHESIS_PROFILE", "ci"))

# float64: both sides compute the same expressions in a different order (fastlstm adds b_ih + b_hh
# first, sums weight gradients in one GEMM over all steps), so they differ by a few ulps times the
# depth of the recurrence: T <= 8 steps, 3 layers. float32: torch.nn.LSTM takes oneDNN's path on
# CPU, whose GEMM blocking and activation approximations differ from MKL's; 1e-4 / 1e-5 leaves
# room for gradients summed over T*B rows of magnitude up to ~H.
TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are far below where fastlstm (or BLAS) splits work over threads, so threads
    only add synchronisation, which costs 100x on a machine whose cores are busy. Splitting is
    covered by test_integration.py (large batch, determinism)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Mostly small sizes (where off-by-one and vector-tail bugs live), sometimes up to 64.
sizes = st.integers(1, 8) | st.integers(1, 64)


@st.composite
def configs(draw):
    hidden = draw(sizes)
    mode = draw(st.sampled_from(["padded", "packed_sorted", "packed_unsorted", "unbatched"]))
    T = draw(st.integers(1, 8))
    B = 1 if mode == "unbatched" else draw(st.integers(1, 5))
    lengths = None
    if mode.startswith("packed"):
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        if mode == "packed_sorted":
            lengths.sort(reverse=True)
    return dict(
        input_size=draw(sizes),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.just(0) | st.integers(0, hidden - 1)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        mode=mode,
        T=T,
        B=B,
        lengths=lengths,
        with_hx=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_inputs(cfg, gen):
    T, B, I, dtype = cfg["T"], cfg["B"], cfg["input_size"], cfg["dtype"]
    if cfg["mode"] == "unbatched":
        x = torch.randn(T, I, generator=gen, dtype=dtype)
    elif cfg["batch_first"]:
        x = torch.randn(B, T, I, generator=gen, dtype=dtype)
    else:
        x = torch.randn(T, B, I, generator=gen, dtype=dtype)
    hx = None
    if cfg["with_hx"]:
        D = 2 if cfg["bidirectional"] else 1
        P = cfg["proj_size"] or cfg["hidden_size"]
        batch = () if cfg["mode"] == "unbatched" else (B,)
        hx = (
            torch.randn(cfg["num_layers"] * D, *batch, P, generator=gen, dtype=dtype),
            torch.randn(cfg["num_layers"] * D, *batch, cfg["hidden_size"], generator=gen,
                        dtype=dtype),
        )
    return x, hx


def _run(module, cfg, x, hx, cotangent_seed):
    """Forward, then the gradients of a random linear function of (output, h_n, c_n) with respect to
    the input, hx and every parameter. Returns (output tensors, gradients)."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    inp = x
    if cfg["mode"].startswith("packed"):
        inp = pack_padded_sequence(
            x, torch.tensor(cfg["lengths"]), batch_first=cfg["batch_first"],
            enforce_sorted=cfg["mode"] == "packed_sorted",
        )
    out, (h_n, c_n) = module(inp, hx)
    if cfg["mode"].startswith("packed"):
        assert isinstance(out, PackedSequence)
        outs = [out.data, out.batch_sizes, out.sorted_indices, out.unsorted_indices]
        out = out.data
    else:
        outs = [out]
    outs += [h_n, c_n]

    gen = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, h_n, c_n)]
    wrt = [x, *(hx or ()), *module.parameters()]
    grads = torch.autograd.grad((out, h_n, c_n), wrt, cotangents, allow_unused=True)
    return outs, grads


def _check_config(cfg):
    kwargs = {k: cfg[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional",
                                  "proj_size", "bias", "batch_first")}
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    ref = torch.nn.LSTM(**kwargs, dtype=cfg["dtype"])
    fast = fastlstm.LSTM(**kwargs, dtype=cfg["dtype"])
    fast.load_state_dict(ref.state_dict())
    x, hx = _make_inputs(cfg, gen)

    ref_outs, ref_grads = _run(ref, cfg, x, hx, cfg["seed"] + 1)
    fast_outs, fast_grads = _run(fast, cfg, x, hx, cfg["seed"] + 1)

    names = ["x", "h0", "c0"][: 3 if hx is not None else 1] + [n for n, _ in fast.named_parameters()]
    tol = TOLERANCES[cfg["dtype"]]
    assert len(fast_outs) == len(ref_outs)
    for i, (a, b) in enumerate(zip(fast_outs, ref_outs)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output {i}: {m}")
    assert len(fast_grads) == len(ref_grads) == len(names)
    for name, a, b in zip(names, fast_grads, ref_grads):
        assert (a is None) == (b is None), f"grad of {name}: {a} vs {b}"
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")


@PROFILE
@given(cfg=configs())
def test_matches_torch_lstm(cfg):
    _check_config(cfg)


@st.composite
def split_configs(draw):
    """A one-directional LSTM run over a sequence in two chunks, carrying (h, c)."""
    hidden = draw(sizes)
    return dict(
        input_size=draw(sizes), hidden_size=hidden, num_layers=draw(st.integers(1, 3)),
        proj_size=draw(st.just(0) | st.integers(0, hidden - 1)), bias=draw(st.booleans()),
        T1=draw(st.integers(1, 6)), T2=draw(st.integers(1, 6)), B=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@PROFILE
@given(cfg=split_configs())
def test_chunked_sequence_matches_whole(cfg):
    """Running [x1; x2] at once equals running x1, then x2 from the state x1 left: what truncated
    backpropagation through time relies on. Checked in float64, where the two must agree to
    rounding."""
    torch.manual_seed(cfg["seed"])
    lstm = fastlstm.LSTM(cfg["input_size"], cfg["hidden_size"], cfg["num_layers"],
                         bias=cfg["bias"], proj_size=cfg["proj_size"], dtype=torch.float64)
    x = torch.randn(cfg["T1"] + cfg["T2"], cfg["B"], cfg["input_size"], dtype=torch.float64)
    whole, (h, c) = lstm(x)
    first, state = lstm(x[: cfg["T1"]])
    second, (h2, c2) = lstm(x[cfg["T1"]:], state)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(torch.cat([first, second]), whole, **tol)
    torch.testing.assert_close(h2, h, **tol)
    torch.testing.assert_close(c2, c, **tol)


def test_profile_is_selected_by_environment():
    name = os.environ.get("FASTLSTM_HYPOTHESIS_PROFILE", "ci")
    assert PROFILE == settings.get_profile(name)
    if name == "ci":
        assert PROFILE.max_examples == 200 and PROFILE.derandomize and PROFILE.deadline is None


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))

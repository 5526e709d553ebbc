"""The CPU layer's plan (csrc/cpu/layer_plan.h): every decision of a call made once, from the shapes,
dtype, CPU and knobs, and printable (the op fastlstm::_lstm_layer_cpu_plan, FASTLSTM_CPU_PLAN=1)."""
import os
import subprocess
import sys

import pytest
import torch

import fastlstm
from fastlstm import _loader
from test_cpu_dispatch import _brgemm_float32

pytestmark = pytest.mark.skipif(_loader.cpu_isa() is None, reason="the compiled CPU ops are not loaded")


def plan(T, B, I, H, dtype=torch.float32, P=None, training=False, reverse=False, lengths=None):
    P_ = P or H
    args = (torch.zeros(T, B, I, dtype=dtype), torch.zeros(B, P_, dtype=dtype), torch.zeros(B, H, dtype=dtype),
            torch.zeros(4 * H, I, dtype=dtype), torch.zeros(4 * H, P_, dtype=dtype),
            torch.zeros(P_, H, dtype=dtype) if P else None, lengths)
    return torch.ops.fastlstm._lstm_layer_cpu_plan(*args, reverse, training)


def field(text, name):
    for word in text.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"no {name}= in {text!r}")


def test_recurrence_strategy_follows_the_shapes():
    assert field(plan(20, 2, 24, 70), "recurrence") == "dot-rows"
    assert field(plan(20, 1, 24, 70, dtype=torch.float64), "recurrence") == "dot-rows"
    # float64 has no brgemm: w_hh read in place up to 32 rows.
    assert field(plan(20, 16, 24, 70, dtype=torch.float64), "recurrence") == "direct"
    if _brgemm_float32():
        assert field(plan(3, 8, 24, 150), "recurrence") == "direct"  # few steps: nothing packed
        assert field(plan(20, 8, 24, 80), "recurrence") == "panels"
        assert field(plan(20, 48, 64, 64, dtype=torch.float64), "recurrence") == "panels"


def test_projection_and_sync_decisions():
    # Training in float32 keeps every step's projection (it becomes the saved gates): one chunk of T.
    text = plan(30, 16, 64, 128, training=True)
    assert field(text, "projection") == "chunk" and field(text, "chunk") == "30"
    if _brgemm_float32():
        text = plan(40, 48, 64, 160)  # inference, panels, several tasks a step, small weights
        assert field(text, "projection") == "block"
        expected = "barrier" if torch.get_num_threads() > 1 else "fork"
        assert field(text, "sync") == expected
    # A projection (proj_size) runs a step at a time, never in the barrier loop.
    assert field(plan(40, 48, 64, 160, P=32), "sync") == "fork"


def test_backward_plan():
    text = plan(10, 2, 8, 16, training=True).splitlines()
    assert len(text) == 2 and text[1].startswith("backward")
    assert field(text[1], "dh") == "in-place"
    back = plan(10, 8, 8, 16, training=True).splitlines()[1]
    assert field(back, "dh") in ("panels", "vnni-panels")
    assert field(back, "weights") == ("blocked" if _brgemm_float32() else "aten")
    assert field(plan(10, 8, 8, 16, dtype=torch.float64, training=True).splitlines()[1], "weights") == "aten"
    # dG's rows padded past 4 KiB multiples (H = 256 in float32: 4H values are 4 KiB).
    assert field(plan(2, 4, 8, 256, training=True).splitlines()[1], "ldg") == str(4 * 256 + 16)
    assert field(plan(2, 4, 8, 200, training=True).splitlines()[1], "ldg") == str(4 * 200)


def test_plan_checks_its_arguments():
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        torch.ops.fastlstm._lstm_layer_cpu_plan(
            torch.zeros(2, 3, 4), torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(20, 4), torch.zeros(20, 4),
            None, None, False, False)


def _run(env, code):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)


def test_knobs_are_read_once_and_shown_in_the_plan():
    code = ("import torch, fastlstm\n"
            "args = (torch.zeros(20, 8, 24), torch.zeros(8, 80), torch.zeros(8, 80), torch.zeros(320, 24),"
            " torch.zeros(320, 80), None, None, False, True)\n"
            "print(torch.ops.fastlstm._lstm_layer_cpu_plan(*args))\n")
    out = _run({"FASTLSTM_CPU_WHH": "direct", "FASTLSTM_CPU_GEMM": "blas", "FASTLSTM_CPU_CACHE_MB": "64"}, code)
    forward, backward = out.stdout.strip().splitlines()
    assert field(forward, "recurrence") == "direct"
    assert field(backward, "weights") == "aten"  # no brgemm
    assert "whh=direct" in forward and "gemm=blas" in forward and "cache_mb=64" in forward


def test_plan_printed_for_every_call_with_FASTLSTM_CPU_PLAN():
    code = ("import torch, fastlstm\n"
            "m = fastlstm.LSTM(6, 10, bidirectional=True)\n"
            "x = torch.randn(5, 3, 6, requires_grad=True)\n"
            "m(x)[0].sum().backward()\n")
    err = _run({"FASTLSTM_CPU_PLAN": "1"}, code).stderr
    lines = [line for line in err.splitlines() if line.startswith("fastlstm: ")]
    forward = [line for line in lines if line.startswith("fastlstm: forward")]
    backward = [line for line in lines if line.startswith("fastlstm: backward")]
    assert len(forward) == 2 and len(backward) == 2, err
    assert sum(" reverse" in line for line in forward) == 1
    assert all("training" in line for line in forward)
    assert _run({}, code).stderr.count("fastlstm: forward") == 0

"""The CPU block cache (csrc/cpu/block_cache.h): the kernels' large buffers are reused across calls
instead of fresh pages, without changing any result; the cap holds; fastlstm.empty_cpu_cache() gives
the blocks back."""
import os
import resource
import subprocess
import sys

import pytest
import torch

import fastlstm
from fastlstm import _loader

pytestmark = pytest.mark.skipif(_loader.cpu_isa() is None, reason="the compiled CPU ops are not loaded")

# Buffers of 1 MiB and more go through the cache: T * B * 4H * 4 bytes = 2.6 MB of gates here, 1 MiB
# weight gradients, 4 MiB LSTMCell weight gradients.
_RUN = r"""
import sys, torch, fastlstm
torch.manual_seed(0)
lstm = fastlstm.LSTM(256, 256, num_layers=2, bidirectional=True)
cell = fastlstm.LSTMCell(512, 512)

def layer_step(x):
    y, (h, c) = lstm(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h.sum() + c.sum()
    return [y.detach(), h.detach(), c.detach(), *torch.autograd.grad(loss, [x, *lstm.parameters()])]

def cell_step(x, hx, cx):
    h, c = cell(x, (hx, cx))
    return [h.detach(), c.detach(),
            *torch.autograd.grad((h * h).sum() + c.sum(), [x, hx, *cell.parameters()])]

x = torch.randn(20, 32, 256, requires_grad=True)
xc, hc, cc = (torch.randn(3, 512, requires_grad=True) for _ in range(3))
# Calls on other data first: the measured calls then get reused blocks, which hold old values.
layer_step(torch.randn(20, 32, 256, requires_grad=True) * 3)
cell_step(*(torch.randn(3, 512, requires_grad=True) * 3 for _ in range(3)))
with torch.no_grad():
    lstm(torch.randn(20, 32, 256))
out = {"layer": layer_step(x), "cell": cell_step(xc, hc, cc)}
with torch.no_grad():
    out["inference"] = list(lstm(x)[0:1])
out["cached_bytes"] = fastlstm.cpu_cache_bytes()
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, cache_mb):
    path = tmp_path / f"cache{cache_mb}.pt"
    env = dict(os.environ)
    env.pop("FASTLSTM_CPU_CACHE_MB", None)
    if cache_mb is not None:
        env["FASTLSTM_CPU_CACHE_MB"] = str(cache_mb)
    result = subprocess.run([sys.executable, "-c", _RUN, str(path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path)


def test_results_are_bitwise_the_same_with_the_cache_off_and_the_cap_holds(tmp_path):
    cached, off, small = _run(tmp_path, None), _run(tmp_path, 0), _run(tmp_path, 1)
    assert cached.pop("cached_bytes") > 0, "nothing was cached at the default cap"
    assert off.pop("cached_bytes") == 0, "FASTLSTM_CPU_CACHE_MB=0 still cached blocks"
    assert small.pop("cached_bytes") <= 1 << 20, "FASTLSTM_CPU_CACHE_MB=1 cached more than 1 MiB"
    for key, tensors in cached.items():
        for i, (a, b, c) in enumerate(zip(tensors, off[key], small[key])):
            assert torch.equal(a, b), f"{key}[{i}]: differs with the cache off"
            assert torch.equal(a, c), f"{key}[{i}]: differs with a 1 MiB cap"


def test_blocks_are_reused_and_given_back():
    m = fastlstm.LSTM(128, 128)
    x = torch.randn(50, 64, 128)  # output 1.6 MB, gates 6.6 MB
    fastlstm.empty_cpu_cache()
    assert fastlstm.cpu_cache_bytes() == 0
    with torch.no_grad():
        y = m(x)[0]
        kept = y.clone()
        del y
        after_one = fastlstm.cpu_cache_bytes()
        assert after_one > 0
        for _ in range(3):
            m(x)
        assert fastlstm.cpu_cache_bytes() == after_one, "repeated calls grew the cache: blocks not reused"
        y = m(x)[0]  # held across the release: its block is not the cache's to free
    assert fastlstm.empty_cpu_cache() > 0
    assert fastlstm.cpu_cache_bytes() == 0
    assert fastlstm.empty_cpu_cache() == 0
    torch.testing.assert_close(y, kept, rtol=0, atol=0)
    del y
    assert fastlstm.cpu_cache_bytes() > 0  # the held output's block came back when it was freed


def test_lstmcell_training_steps_touch_no_fresh_pages():
    """The reason for the cache: each batch-1 training step at H = 1024 makes two 16 MiB weight
    gradients; from fresh pages that is a page fault per 4 KiB, as costly as the step (NOTES.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cell = fastlstm.LSTMCell(1024, 1024)
        x, h, c = torch.randn(1, 1024), torch.zeros(1, 1024), torch.zeros(1, 1024)

        def step():
            hh, cc = cell(x, (h, c))
            (hh.sum() + cc.sum()).backward()

        for _ in range(3):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10
    finally:
        torch.set_num_threads(before)
    pages = 2 * 4 * 1024 * 1024 * 4 // 4096  # the two weight gradients
    assert per_step < 0.05 * pages, f"{per_step:.0f} page faults a step (weight gradients: {pages} pages)"


_MOVE_ON = r"""
import resource, torch, fastlstm
torch.set_num_threads(1)
with torch.no_grad():
    fastlstm.LSTM(128, 128)(torch.randn(100, 64, 128))  # its 13 MB of gates stay cached
    small, x = fastlstm.LSTM(128, 128), torch.randn(50, 64, 128)  # 6.6 MB of gates, 1.6 MB output
    for _ in range(3):
        small(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        small(x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10, fastlstm.cpu_cache_bytes())
"""


def test_a_full_cache_makes_room_for_new_shapes():
    """With the cap full of an earlier shape's blocks, a new shape's blocks replace the oldest ones
    instead of being freed (and their pages faulted in again) on every call. A fixed mmap threshold
    makes glibc return every block above 128 KiB to the kernel, as it always does for blocks above
    32 MiB; the small buffers (under the cache's 1 MiB) still fault then, so the cache's run is
    compared with a run without it."""
    def faults_per_call(cache_mb):
        # FASTLSTM_CPU_PROJ=whole: each call's gates are one block of all its steps, as `pages`
        # below counts them (by default these inference calls keep 8 steps at a time: 1 MiB).
        env = dict(os.environ, FASTLSTM_CPU_CACHE_MB=cache_mb, FASTLSTM_CPU_PROJ="whole",
                   GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
        result = subprocess.run([sys.executable, "-c", _MOVE_ON], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        per_call, cached = (float(v) for v in result.stdout.split())
        assert cached <= int(cache_mb) << 20
        return per_call

    off, cached = faults_per_call("0"), faults_per_call("16")
    pages = (50 * 64 * 512 + 50 * 64 * 128) * 4 // 4096  # the call's gates and output
    assert off > 0.5 * pages, f"without the cache only {off:.0f} page faults a call: no test"
    assert cached < 0.15 * off, f"{cached:.0f} page faults a call with a full cache ({off:.0f} without it)"

"""fastlstm.LSTM inside the rest of PyTorch: DistributedDataParallel, TorchScript, the meta device,
pickling, determinism, double backward, extreme sizes, non-finite inputs and memory over many steps.
CPU only; every test finishes in seconds."""
from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm


class TinyModel(nn.Module):
    """A small classifier: a two-layer fastlstm.LSTM, then a linear head on the last step."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lstm = fastlstm.LSTM(4, 8, 2, batch_first=True, dtype=dtype)
        self.head = nn.Linear(8, 3, dtype=dtype)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel over gloo, two CPU processes

DDP_SEED, DDP_BATCH, DDP_T, DDP_LR = 1234, 8, 5, 0.5


def _ddp_problem():
    """The same initial model and data in every process."""
    torch.manual_seed(DDP_SEED)
    model = TinyModel(dtype=torch.float64)
    x = torch.randn(DDP_BATCH, DDP_T, 4, dtype=torch.float64)
    y = torch.randn(DDP_BATCH, 3, dtype=torch.float64)
    return model, x, y


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()  # a mean: averaging two half-batch gradients gives this one
    opt.step()


def _ddp_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model, x, y = _ddp_problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * DDP_BATCH // world_size, (rank + 1) * DDP_BATCH // world_size)
        _sgd_step(ddp, x[shard], y[shard])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears gloo down while the other still talks to it (that aborts the other process:
        # "terminate called without an active exception", seen once in a CI run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_gloo_matches_single_process(tmp_path, monkeypatch):
    world_size, deadline_s = 2, 120
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # containers may not resolve their hostname
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):  # raises with the child's traceback if a worker failed
            assert time.monotonic() < deadline, f"DDP workers still running after {deadline_s} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)

    model, x, y = _ddp_problem()
    initial = copy.deepcopy(model.state_dict())
    _sgd_step(model, x, y)
    expected = model.state_dict()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), f"{name} did not change in the SGD step"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-12, atol=1e-14, msg=name)
        assert torch.equal(ranks[1][name], ranks[0][name]), f"{name} differs between ranks"


# --------------------------------------------------------------------------------------------------
# TorchScript


def test_jit_trace_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(3, 6, 4)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    # Other sizes: nothing about T or B was frozen into the trace.
    x2 = torch.randn(5, 9, 4)
    torch.testing.assert_close(traced(x2), model(x2), rtol=0, atol=0)
    # Gradients through the traced graph.
    model.zero_grad()
    model(x2).square().sum().backward()
    eager_grads = _grads(model)
    model.zero_grad()
    traced(x2).square().sum().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=0, msg=name)
    # A saved trace loads (with fastlstm imported, the op it calls is registered) and runs.
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(x2), model(x2), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The meta device

META_CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=3, batch_first=True),
    dict(num_layers=3, bidirectional=True, proj_size=2, bias=False),
]


@pytest.mark.parametrize("config", META_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_meta_construction_and_forward(config):
    fast = fastlstm.LSTM(5, 6, device="meta", **config)
    ref = nn.LSTM(5, 6, device="meta", **config)
    assert all(p.is_meta for p in fast.parameters())
    T, B = 7, 4
    D, L = 2 if fast.bidirectional else 1, fast.num_layers
    P = fast.proj_size or fast.hidden_size
    x = torch.empty((B, T, 5) if fast.batch_first else (T, B, 5), device="meta")
    hx = (torch.empty(L * D, B, P, device="meta"), torch.empty(L * D, B, 6, device="meta"))
    out, (h, c) = fast(x)
    assert out.is_meta and h.is_meta and c.is_meta
    assert out.shape == ((B, T, D * P) if fast.batch_first else (T, B, D * P))
    assert h.shape == (L * D, B, P) and c.shape == (L * D, B, 6)
    calls = [(x, hx), (x[0] if fast.batch_first else x[:, 0],)]  # and unbatched [T, I]
    for args in calls:
        out, (h, c) = fast(*args)
        ref_out, (ref_h, ref_c) = ref(*args)
        assert out.is_meta and h.is_meta and c.is_meta
        assert (out.shape, h.shape, c.shape) == (ref_out.shape, ref_h.shape, ref_c.shape)


def test_meta_forward_packed():
    lengths = torch.tensor([7, 5, 2])
    fast = fastlstm.LSTM(5, 6, 2, bidirectional=True, device="meta")
    ref = nn.LSTM(5, 6, 2, bidirectional=True, device="meta")
    packed = pack_padded_sequence(torch.empty(7, 3, 5, device="meta"), lengths)
    ref_out, (ref_h, _) = ref(packed)
    out, (h, _) = fast(packed)
    assert out.data.is_meta
    assert out.data.shape == ref_out.data.shape == (14, 12)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert h.shape == ref_h.shape


def test_meta_to_empty_then_reset_parameters():
    torch.manual_seed(7)
    ref = nn.LSTM(5, 6, 2, bidirectional=True, proj_size=3)
    fast = fastlstm.LSTM(5, 6, 2, bidirectional=True, proj_size=3, device="meta")
    fast.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in fast.parameters())
    torch.manual_seed(7)
    fast.reset_parameters()
    # The same initialisation as torch.nn.LSTM, drawn in the same order.
    for (name, p), (ref_name, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert name == ref_name
        assert torch.equal(p, q), name
    x = torch.randn(4, 2, 5)
    out, (h, c) = fast(x)
    ref_out, (ref_h, ref_c) = ref(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close((h, c), (ref_h, ref_c))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fast.parameters())


# --------------------------------------------------------------------------------------------------
# Pickling, torch.save, deepcopy


def _roundtrips():
    def via_pickle(m):
        return pickle.loads(pickle.dumps(m))

    def via_torch_save(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"pickle": via_pickle, "torch_save": via_torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(_roundtrips()))
@pytest.mark.parametrize("what", ["lstm", "model"])
def test_whole_module_roundtrip(how, what):
    torch.manual_seed(3)
    if what == "lstm":
        module = fastlstm.LSTM(4, 8, 2, bidirectional=True, proj_size=5)
        x = torch.randn(6, 3, 4)
    else:
        module = TinyModel()
        x = torch.randn(3, 6, 4)
    copied = _roundtrips()[how](module)
    assert copied is not module
    assert type(copied) is type(module)
    assert repr(copied) == repr(module)

    def run(m):
        m.zero_grad()
        y = m(x)
        out = y[0] if isinstance(y, tuple) else y
        out.square().sum().backward()
        return out.detach(), _grads(m)

    out, grads = run(module)
    copied_out, copied_grads = run(copied)
    torch.testing.assert_close(copied_out, out, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(copied_grads[name], g, rtol=0, atol=0, msg=name)
    # The copy runs on its own parameters (RNNBase keeps a second list of them, _flat_weights,
    # which must follow): changing the copy changes its output and leaves the original's alone.
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    changed_out, _ = run(copied)
    assert not torch.equal(changed_out, out)
    torch.testing.assert_close(run(module)[0], out, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_step_is_bitwise_deterministic(packed):
    # B * H large enough that the per-step row loop is split over threads.
    torch.manual_seed(11)
    state = fastlstm.LSTM(16, 32, 2, bidirectional=True).state_dict()
    x = torch.randn(12, 512, 16)
    lengths = torch.randint(1, 13, (512,))

    def step():
        lstm = fastlstm.LSTM(16, 32, 2, bidirectional=True)
        lstm.load_state_dict(state)
        xx = x.clone().requires_grad_()
        inp = pack_padded_sequence(xx, lengths, enforce_sorted=False) if packed else xx
        out, (h, c) = lstm(inp)
        out = out.data if packed else out
        (out.square().mean() + h.sum() + c.sum()).backward()
        return out.detach(), {"x": xx.grad, **_grads(lstm)}

    out1, grads1 = step()
    out2, grads2 = step()
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


# --------------------------------------------------------------------------------------------------
# Double backward


def _gradient_penalty_grads(module, x, lengths):
    """d/d(x, params) of || d loss / d(x, params) ||^2, the pattern of WGAN-GP and friends."""
    x = x.clone().requires_grad_()
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h, c) = module(inp)
    out = out.data if lengths is not None else out
    loss = out.square().sum() + h.sum() + (c * c).sum()
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return torch.autograd.grad(penalty, wrt)


@pytest.mark.parametrize("config", [
    dict(num_layers=1, packed=False),
    dict(num_layers=2, bidirectional=True, proj_size=3, packed=False),
    dict(num_layers=2, bidirectional=True, bias=False, packed=True),
], ids=["plain", "bidir-proj", "packed"])
def test_gradient_penalty_matches_torch(config):
    config = dict(config)
    packed = config.pop("packed")
    torch.manual_seed(5)
    ref = nn.LSTM(3, 5, dtype=torch.float64, **config)
    fast = fastlstm.LSTM(3, 5, dtype=torch.float64, **config)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 3]) if packed else None
    expected = _gradient_penalty_grads(ref, x, lengths)
    got = _gradient_penalty_grads(fast, x, lengths)
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_gradgradcheck(proj_size):
    torch.manual_seed(9)
    lstm = fastlstm.LSTM(2, 3, proj_size=proj_size, dtype=torch.float64)
    P = proj_size or 3
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0"] + (["weight_hr_l0"] if proj_size else [])
    fixed = {n: p.detach() for n, p in lstm.named_parameters() if n not in names}

    def f(x, h0, c0, *weights):
        params = {**fixed, **dict(zip(names, weights))}
        out, (h, c) = torch.func.functional_call(lstm, params, (x, (h0, c0)))
        return out, h, c

    inputs = (
        torch.randn(3, 2, 2, dtype=torch.float64),
        torch.randn(1, 2, P, dtype=torch.float64),
        torch.randn(1, 2, 3, dtype=torch.float64),
        *(getattr(lstm, n).detach().clone() for n in names),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# --------------------------------------------------------------------------------------------------
# Limits: very long, empty, tiny and very wide


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while fn runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


def test_very_long_sequence_forward_backward_linear_memory():
    torch.manual_seed(0)
    lstm = fastlstm.LSTM(3, 4)
    saved = {}
    for T in (10_000, 100_000):
        x = torch.randn(T, 1, 3, requires_grad=True)
        (out, (h, c)), saved[T] = _saved_bytes(lambda: lstm(x))
        assert out.shape == (T, 1, 4)
        lstm.zero_grad()
        (out.sum() + h.sum() + c.sum()).backward()
        assert x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in lstm.parameters())
    # Saved activations grow linearly with T: 10x the steps, 10x the bytes (up to the fixed part).
    assert 9.5 < saved[100_000] / saved[10_000] < 10.5, saved
    # ... and stay small per step: input (I) + output (P) + gates (4H) + cells (H) floats, plus slack.
    per_step = (saved[100_000] - saved[10_000]) / 90_000
    assert per_step <= 4 * (3 + 4 + 4 * 4 + 4) * 1.5, per_step


def _compare_with_torch(config, x_shape, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.LSTM(**config, dtype=dtype)
    fast = fastlstm.LSTM(**config, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(x_shape, dtype=dtype)
    results = []
    for module in (ref, fast):
        xx = x.clone().requires_grad_()
        out, (h, c) = module(xx)
        (out.square().mean() + h.sum() + c.sum()).backward()
        results.append(((out, h, c), {"x": xx.grad, **_grads(module)}))
    (ref_outs, ref_grads), (outs, grads) = results
    for name, a, b in zip(("output", "h_n", "c_n"), outs, ref_outs):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, msg=name)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], msg=name)


def test_batch_zero():
    _compare_with_torch(dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True),
                        (5, 0, 3))


@pytest.mark.parametrize("layers", [1, 2])
def test_hidden_size_one(layers):
    _compare_with_torch(dict(input_size=3, hidden_size=1, num_layers=layers, bidirectional=True),
                        (6, 2, 3), dtype=torch.float64)


def test_very_large_batch():
    """B = 20,000: one step's rows are split over threads, and every row must still be right.
    Compared with a float64 torch.nn.LSTM: outputs and the input gradient row by row; weight and
    bias gradients are float32 sums over T*B = 60,000 rows, whose rounding error grows with the
    size of the sum rather than of each entry, so their tolerance is relative to the largest entry.
    torch.nn.LSTM in float32 must meet the same bounds (it does, with room)."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 8, dtype=torch.float64)
    fast = fastlstm.LSTM(5, 8)
    torch32 = nn.LSTM(5, 8)
    fast.load_state_dict(ref.state_dict())
    torch32.load_state_dict(ref.state_dict())
    x = torch.randn(3, 20_000, 5, dtype=torch.float64)

    def run(module, dtype):
        xx = x.to(dtype, copy=True).requires_grad_()
        out, (h, c) = module(xx)
        (out.square().mean() + h.sum() + c.sum()).backward()
        grads = {n: p.grad.double() for n, p in module.named_parameters()}
        return [t.detach().double() for t in (out, h, c, xx.grad)], grads

    exact, exact_grads = run(ref, torch.float64)
    for module in (fast, torch32):
        values, grads = run(module, torch.float32)
        for name, a, b in zip(("output", "h_n", "c_n", "x.grad"), values, exact):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for name, g in grads.items():
            scale = exact_grads[name].abs().max().item()
            torch.testing.assert_close(g, exact_grads[name], rtol=1e-4, atol=4e-5 * scale,
                                       msg=lambda m: f"{name}: {m}")


def test_nan_and_inf_propagate_like_torch():
    torch.manual_seed(4)
    ref = nn.LSTM(3, 4, 2)
    fast = fastlstm.LSTM(3, 4, 2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, 3)
    x[1, 0, 1] = float("nan")
    x[0, 2, 0] = float("inf")
    x[2, 3, 2] = -float("inf")
    c0 = torch.zeros(2, 4, 4)
    c0[0, 1, 2] = float("inf")
    h0 = torch.zeros(2, 4, 4)
    results = []
    for module in (ref, fast):
        xx = x.clone().requires_grad_()
        out, (h, c) = module(xx, (h0, c0))
        out.sum().backward()
        results.append([out, h, c, xx.grad, *(p.grad for p in module.parameters())])
    expected, got = results
    assert torch.isnan(expected[0]).any() and torch.isinf(expected[2]).any()  # the test bites
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"NaN pattern of result {i}"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"Inf pattern of result {i}"
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"result {i}: {m}")


# --------------------------------------------------------------------------------------------------
# No leak


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_memory_growth_over_training():
    torch.manual_seed(2)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 10, 4)
    y = torch.randn(4, 3)
    lengths = torch.tensor([10, 3, 7, 5])
    packed_lstm = fastlstm.LSTM(4, 8)

    def step():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        out, (h, c) = packed_lstm(pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False))
        (loss + out.data.sum() + h.sum()).backward()
        opt.step()
        return loss.item()

    # One thread: no thread pool to warm up, and fast on a machine whose cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(100):
            step()
        gc.collect()
        before = _rss_bytes()
        losses = [step() for _ in range(1000)]
        gc.collect()
        growth = _rss_bytes() - before
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0]  # it did train
    # Keeping one layer's autograd graph alive per step (a leaked saved tensor) adds ~20 MiB here.
    assert growth < 5 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 steps"

"""The CUDA ops: parity with cuDNN's torch.nn.LSTM and with float64 on the CPU, gradcheck, opcheck,
torch.compile, CUDA-graph capture, fp16/bf16 accuracy against cuDNN's own, and bitwise determinism.
Every test needs a GPU (benchmarks/gpu/run1_build_and_test.sh runs them on one)."""
import copy
import gc
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
# float64: the same math in a different order. float32 (TF32 off on both sides): rounding, amplified
# a little by the recurrence; against float64 the error is float32's own.
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Case:
    """One configuration, built once in float64 on the CPU; `on(device, dtype)` gives the same module,
    inputs and loss weights anywhere, so results on different devices and dtypes are comparable."""

    def __init__(self, T, B, I, H, lengths=None, sorted_=False, with_hx=True, **kwargs):
        self.ref = torch.nn.LSTM(I, H, dtype=torch.float64, **kwargs)
        self.kwargs = dict(kwargs, input_size=I, hidden_size=H)
        self.batch_first = kwargs.get("batch_first", False)
        self.lengths, self.sorted_ = lengths, sorted_
        D = 2 if self.ref.bidirectional else 1
        P = self.ref.proj_size or H
        L = self.ref.num_layers
        self.x = torch.randn(*((B, T) if self.batch_first else (T, B)), I, dtype=torch.float64)
        self.hx = (torch.randn(L * D, B, P, dtype=torch.float64),
                   torch.randn(L * D, B, H, dtype=torch.float64)) if with_hx else None
        out, (h, c) = self.ref(self.input(self.x), self.hx)
        data = out.data if isinstance(out, PackedSequence) else out
        self.weights = [torch.randn_like(data), torch.randn_like(h), torch.randn_like(c)]

    def input(self, x):
        if self.lengths is None:
            return x
        return pack_padded_sequence(x, torch.tensor(self.lengths), batch_first=self.batch_first,
                                    enforce_sorted=self.sorted_)

    def module(self, cls, device, dtype):
        m = cls(**self.kwargs, device=device, dtype=dtype)
        m.load_state_dict(self.ref.state_dict())
        return m

    def run(self, cls, device, dtype):
        """Returns [output, h_n, c_n, grad x, grad h0, grad c0, grad of every parameter]."""
        m = self.module(cls, device, dtype)
        x = self.x.to(device, dtype).requires_grad_()
        hx = None
        if self.hx is not None:
            hx = tuple(t.to(device, dtype).requires_grad_() for t in self.hx)
        out, (h, c) = m(self.input(x), hx)
        data = out.data if isinstance(out, PackedSequence) else out
        loss = sum((r * w.to(device, dtype)).sum() for r, w in zip((data, h, c), self.weights))
        leaves = [x] + (list(hx) if hx else []) + list(m.parameters())
        return [data.detach(), h.detach(), c.detach()] + list(torch.autograd.grad(loss, leaves))


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.to(b.device, b.dtype), b, **tol, msg=lambda m: f"[{i}] {m}")


GRID = list(itertools.product(
    [1, 2],                        # num_layers
    [False, True],                 # bidirectional
    [0, 3],                        # proj_size
    [True, False],                 # bias
    [False, True],                 # batch_first
    [False, True],                 # packed (unsorted lengths)
))


def _ids(p):
    L, bi, proj, bias, bf, packed = p
    return (f"L{L}-{'bi' if bi else 'uni'}-proj{proj}-{'bias' if bias else 'nobias'}-"
            f"{'bf' if bf else 'tf'}-{'packed' if packed else 'padded'}")


def _grid_case(config, T=6, B=5, I=7, H=9):
    L, bi, proj, bias, bf, packed = config
    return Case(T, B, I, H, lengths=[4, 6, 1, 6, 3] if packed else None, num_layers=L,
                bidirectional=bi, proj_size=proj, bias=bias, batch_first=bf)


def test_backend_is_compiled():
    assert fastlstm.backend("cuda") == "compiled"


@pytest.mark.parametrize("config", GRID, ids=[_ids(p) for p in GRID])
def test_parity_float32_with_cudnn_and_float64(config):
    case = _grid_case(config)
    ours = case.run(fastlstm.LSTM, CUDA, torch.float32)
    assert_all_close(ours, case.run(torch.nn.LSTM, CUDA, torch.float32), **TOL[torch.float32])
    assert_all_close(ours, case.run(torch.nn.LSTM, "cpu", torch.float64), **TOL[torch.float32])


@pytest.mark.parametrize("config", GRID, ids=[_ids(p) for p in GRID])
def test_parity_float64_with_cpu(config):
    case = _grid_case(config)
    assert_all_close(case.run(fastlstm.LSTM, CUDA, torch.float64),
                     case.run(torch.nn.LSTM, "cpu", torch.float64), **TOL[torch.float64])


# Shapes that exercise every kernel configuration: batch tiles of 8, 16 and 32 rows (the last needs
# B > 16 and at least 128 blocks), several hidden-unit tiles, units not a multiple of the 16-byte
# vector width, a single unit.
@pytest.mark.parametrize("T,B,I,H,proj", [(1, 1, 1, 1, 0), (9, 7, 13, 11, 0), (3, 2, 33, 17, 5),
                                          (4, 12, 5, 64, 0), (3, 40, 16, 130, 24),
                                          (2, 70, 8, 1100, 0), (5, 3, 4, 24, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_awkward_shapes(T, B, I, H, proj, dtype):
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    for kwargs in (dict(bidirectional=True, proj_size=proj), dict(lengths=lengths)):
        case = Case(T, B, I, H, **kwargs)
        assert_all_close(case.run(fastlstm.LSTM, CUDA, dtype),
                         case.run(torch.nn.LSTM, "cpu", torch.float64), **TOL[dtype])


# --- the ops ----------------------------------------------------------------------------------------

VARIANTS = list(itertools.product([False, True], [False, True], [False, True], [False, True]))
IDS = [f"{'proj' if p else 'noproj'}-{'len' if l else 'nolen'}-{'rev' if r else 'fwd'}-"
       f"{'bias' if b else 'nobias'}" for p, l, r, b in VARIANTS]


def layer_args(proj, lengths, reverse, bias, dtype=torch.float64, T=4, B=3, I=5, H=6, P=4,
               requires_grad=True):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=CUDA, requires_grad=requires_grad)
    Hp = P if proj else H
    # Length 0 (never active), T (always) and one in between; in the reverse direction the last
    # sequence starts at t = 1.
    lens = torch.tensor([T, 0, 2][:B], device=CUDA) if lengths else None
    return (leaf(T, B, I), leaf(B, Hp), leaf(B, H), leaf(4 * H, I), leaf(4 * H, Hp),
            leaf(4 * H) if bias else None, leaf(4 * H) if bias else None,
            leaf(P, H) if proj else None, lens, reverse)


@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_gradcheck_layer(proj, lengths, reverse, bias):
    args = layer_args(proj, lengths, reverse, bias)
    tensors, lens, rev = args[:8], args[8], args[9]
    assert torch.autograd.gradcheck(
        lambda *t: fastlstm.ops.lstm_layer(*t, lengths=lens, reverse=rev), tensors)


@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_layer_matches_reference(proj, lengths, reverse, bias):
    args = layer_args(proj, lengths, reverse, bias, requires_grad=False)
    got = fastlstm.ops.lstm_layer(*args)
    want = fastlstm.reference.lstm_layer(*args)
    assert_all_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_opcheck_forward(proj, lengths, reverse, bias):
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer_forward.default,
                          layer_args(proj, lengths, reverse, bias))


@pytest.mark.parametrize("proj,lengths,reverse", [v[:3] for v in VARIANTS[::2]],
                         ids=[i.rsplit("-", 1)[0] for i in IDS[::2]])
def test_opcheck_backward(proj, lengths, reverse):
    args = layer_args(proj, lengths, reverse, True, requires_grad=False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, rev = args
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*args)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer_backward.default,
                          (*grads, x, h0, c0, w_ih, w_hh, w_hr, lens, out, gates, cells, hidden,
                           rev))


@pytest.mark.skipif(fastlstm.backend("cpu") != "compiled", reason="the CPU ops are not built")
@pytest.mark.parametrize("proj,lengths,reverse,bias", VARIANTS, ids=IDS)
def test_ops_match_cpu_ops(proj, lengths, reverse, bias):
    # All six forward outputs (the saved gates, cells and hidden too) and all seven gradients: the
    # two backends implement one contract.
    args = layer_args(proj, lengths, reverse, bias, requires_grad=False)
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    fwd = torch.ops.fastlstm.lstm_layer_forward(*args)
    fwd_cpu = torch.ops.fastlstm.lstm_layer_forward(*cpu)
    assert_all_close(fwd, fwd_cpu, **TOL[torch.float64])
    grads = [torch.randn_like(t) for t in fwd[:3]]
    x, h0, c0, w_ih, w_hh, _, _, w_hr, lens, rev = args
    bwd = torch.ops.fastlstm.lstm_layer_backward(*grads, x, h0, c0, w_ih, w_hh, w_hr, lens, *fwd[:1],
                                                 *fwd[3:], rev)
    x, h0, c0, w_ih, w_hh, _, _, w_hr, lens, rev = cpu
    bwd_cpu = torch.ops.fastlstm.lstm_layer_backward(*[g.cpu() for g in grads], x, h0, c0, w_ih,
                                                     w_hh, w_hr, lens, *fwd_cpu[:1], *fwd_cpu[3:],
                                                     rev)
    assert_all_close(bwd, bwd_cpu, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj", [False, True])
def test_output_contract(dtype, proj):
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in layer_args(proj, True, False, True, requires_grad=False)]
    T, B, H, P = 4, 3, 6, (4 if proj else 6)
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*args)
    cell_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for t, shape, dt in ((out, (T, B, P), dtype), (h_n, (B, P), dtype), (c_n, (B, H), dtype),
                         (gates, (T, B, 4 * H), dtype), (cells, (T, B, H), cell_dtype),
                         (hidden, (T, B, H) if proj else (0,), dtype)):
        assert (tuple(t.shape), t.dtype, t.device.type) == (shape, dt, "cuda")
        assert t.is_contiguous()
    # Sequence 1 has length 0: no output, state carried, cells carry c0.
    assert not out[:, 1].any()
    torch.testing.assert_close(h_n[1], args[1][1], rtol=0, atol=0)
    torch.testing.assert_close(cells[:, 1], args[2][1].to(cell_dtype).expand(T, H), rtol=0, atol=0)
    grads = torch.ops.fastlstm.lstm_layer_backward(
        torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), *args[:5], args[7],
        args[8], out, gates, cells, hidden, False)
    for g, shape in zip(grads, ((T, B, 5), (B, P), (B, H), (4 * H, 5), (4 * H, P), (4 * H,),
                                (P, H) if proj else (0,))):
        assert (tuple(g.shape), g.dtype) == (shape, dtype)


def test_empty_batch():
    args = layer_args(True, True, True, True, B=0, requires_grad=False)
    args = args[:8] + (torch.zeros(0, dtype=torch.int64, device=CUDA), True)
    out, h_n, c_n, gates, cells, hidden = torch.ops.fastlstm.lstm_layer_forward(*args)
    assert [tuple(t.shape) for t in (out, h_n, c_n, gates, cells, hidden)] == [
        (4, 0, 4), (0, 4), (0, 6), (4, 0, 24), (4, 0, 6), (4, 0, 6)]
    grads = torch.ops.fastlstm.lstm_layer_backward(
        torch.zeros_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n), *args[:5], args[7],
        args[8], out, gates, cells, hidden, True)
    assert [tuple(g.shape) for g in grads] == [(4, 0, 5), (0, 4), (0, 6), (24, 5), (24, 4), (24,),
                                               (4, 6)]
    assert all(not g.any() for g in grads)


# --- torch.compile and CUDA graphs ------------------------------------------------------------------

class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.lstm = fastlstm.LSTM(8, 12, num_layers=2, bidirectional=True, proj_size=5,
                                  batch_first=True)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    model = Tagger().to(CUDA)
    tokens = torch.randint(0, 20, (4, 7), device=CUDA)
    out_c = torch.compile(model, fullgraph=True)(tokens)
    out_e = model(tokens)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    grads_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _graphed(step):
    """Captures step() (forward + backward) after warm-up on a side stream, as in PyTorch's CUDA-graph
    notes; returns the graph and what the captured step returned."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    return graph, static_out


def test_cuda_graph_training_step():
    model = fastlstm.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=6).to(CUDA)
    eager_model = copy.deepcopy(model)
    static_x = torch.randn(7, 5, 8, device=CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        out, (h, c) = model(static_x)
        loss = out.square().mean() + h.square().mean()
        loss.backward()
        return loss.detach()

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    graph, static_loss = _graphed(step)
    eager_model.load_state_dict(model.state_dict())  # the warm-up changed nothing (no opt.step)
    for _ in range(2):
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        eager_model.zero_grad()
        out, (h, c) = eager_model(new_x)
        loss = out.square().mean() + h.square().mean()
        loss.backward()
        # Same kernels, same data; cuBLAS may pick another algorithm inside a capture.
        torch.testing.assert_close(static_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        for p, q in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_cuda_graph_layer_with_lengths():
    # The op must never synchronise with the host (no length checks on the CPU side), or capture
    # fails; lengths live on the device and can change between replays.
    args = layer_args(True, True, True, True, dtype=torch.float32, T=6, B=3)
    tensors, lens = args[:8], args[8].clone()

    def step():
        out, h, c = fastlstm.ops.lstm_layer(*tensors, lengths=lens, reverse=True)
        return torch.autograd.grad((out.sum() + h.sum() + c.sum()), tensors[:5])

    graph, static_grads = _graphed(step)
    for new_lengths in ([6, 0, 2], [1, 6, 3]):
        lens.copy_(torch.tensor(new_lengths))
        graph.replay()
        out, h, c = fastlstm.ops.lstm_layer(*tensors, lengths=lens, reverse=True)
        eager = torch.autograd.grad((out.sum() + h.sum() + c.sum()), tensors[:5])
        for a, b in zip(static_grads, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- half precision and determinism -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True),
                                    dict(proj_size=16), dict(lengths=[40, 13, 40, 1, 27, 40, 8, 2])],
                         ids=["plain", "L2-bi", "proj", "packed"])
def test_low_precision_error_within_cudnn_error(dtype, kwargs):
    # flash-attention's rule: our error against a float32 reference is at most a small multiple of
    # PyTorch's own (cuDNN's, for torch.nn.LSTM on the GPU) error in that dtype.
    case = Case(40, 8, 64, 128, **kwargs)
    ref = case.run(torch.nn.LSTM, CUDA, torch.float32)
    ours = case.run(fastlstm.LSTM, CUDA, dtype)
    torch_lp = case.run(torch.nn.LSTM, CUDA, dtype)
    eps = 1e-3 if dtype == torch.float16 else 1e-2
    names = ["output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0"] + [
        n for n, _ in case.ref.named_parameters()]
    for name, a, b, r in zip(names, ours, torch_lp, ref):
        ours_err = (a.float() - r).abs().max().item()
        torch_err = (b.float() - r).abs().max().item()
        scale = r.abs().max().item()
        assert ours_err <= 3 * torch_err + eps * max(1.0, scale), (
            f"{name}: fastlstm error {ours_err:.3e}, torch {dtype} error {torch_err:.3e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_backward_is_bitwise_deterministic(dtype):
    case = Case(12, 20, 24, 48, lengths=[12, 3, 7, 12, 1] * 4, num_layers=2, bidirectional=True,
                proj_size=8)
    first = case.run(fastlstm.LSTM, CUDA, dtype)
    for _ in range(2):
        again = case.run(fastlstm.LSTM, CUDA, dtype)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# Bitwise identical gradients from two fresh processes: no atomics, no dependence on allocation
# addresses or on what ran before. Every dtype, and shapes that reach all three batch tiles
# (B=260, H=240 gives 9 x 15 = 135 blocks of 32 rows, csrc/kernels/lstm_launch.cuh).
_DIGEST_SCRIPT = r"""
import hashlib, torch, fastlstm
from torch.nn.utils.rnn import pack_padded_sequence
h = hashlib.sha256()
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    for T, B, H in ((5, 6, 20), (5, 13, 24), (4, 260, 240)):
        torch.manual_seed(0)
        m = fastlstm.LSTM(16, H, num_layers=2, bidirectional=True, proj_size=8).to("cuda", dtype)
        x = torch.randn(T, B, 16, device="cuda", dtype=dtype, requires_grad=True)
        lengths = torch.randint(1, T + 1, (B,))
        out, (hn, cn) = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        (out.data.float().square().sum() + hn.float().sum() + cn.float().sum()).backward()
        for t in [out.data, x.grad] + [p.grad for p in m.parameters()]:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_gradients_bitwise_identical_across_processes():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlstm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    digests = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        digests.append(run.stdout.split()[-1])
    assert len(digests[0]) == 64 and digests[0] == digests[1], digests


def _allocated():
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_training_memory_is_flat_over_1000_steps():
    # A leak of one saved tensor per step (an autograd cycle through the op's ctx, a workspace kept
    # alive by the binding) grows memory_allocated by at least that tensor each step.
    gc.collect()
    torch.manual_seed(0)
    model = fastlstm.LSTM(16, 64, num_layers=2, bidirectional=True, proj_size=24).to(CUDA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    T, B = 20, 24
    x = torch.randn(T, B, 16, device=CUDA)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T

    def step():
        opt.zero_grad(set_to_none=True)
        out, (h, c) = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
        loss = out.data.square().mean() + h.square().mean() + c.square().mean()
        loss.backward()
        opt.step()
        # Inference too: no_grad forward saves nothing and must free everything it made.
        with torch.no_grad():
            model(x)

    for _ in range(10):  # Adam's state exists from the first step on
        step()
    after, peaks = [], []
    for i in range(1000):
        if i in (0, 990):
            torch.cuda.reset_peak_memory_stats()
        step()
        after.append(_allocated())
        if i in (9, 999):
            peaks.append(torch.cuda.max_memory_allocated())
    assert max(after) == min(after), (
        f"memory_allocated after each step ranged {min(after)}..{max(after)} bytes "
        f"(first {after[0]}, last {after[-1]})")
    assert peaks[0] == peaks[1], f"peak per 10 steps grew from {peaks[0]} to {peaks[1]} bytes"

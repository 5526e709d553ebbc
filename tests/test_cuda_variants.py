"""The variant layer's CUDA ops (issue 29: torch.ops.fastlstm.lstm_variant_forward/backward, csrc/cuda/
variant_cuda.cpp) on a GPU, against fastlstm/reference.py in float64 and against the CPU op's `saved`;
gradcheck, bitwise determinism and CUDA-graph capture.
The inputs and the checks are tests/test_emulator_variants.py's, which runs the same kernels on the
CPU emulator. Every test needs a GPU (benchmarks/gpu/run1_build_and_test.sh runs them on one)."""
import pytest
import torch

import fastlstm  # noqa: F401  (registers torch.ops.fastlstm)
import test_emulator_variants as tv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F64 = torch.float64
DEVICE = "cuda"


def _op(name):
    return getattr(torch.ops.fastlstm, name)


def _has_cpu_variant_op():
    return (fastlstm.backend("cpu") == "compiled" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastlstm::lstm_variant_forward", "CPU"))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def forward(case, device, training=True):
    out = _op("lstm_variant_forward")(*tv.op_args(case, device, training))
    return {"output": out[0].cpu(), "h_n": out[1].cpu(), "c_n_acc": out[2].to(case.cell).cpu(),
            "saved": out[3].cpu()}, out


def backward(case, device, out):
    res = _op("lstm_variant_backward")(*tv.op_backward_args(case, device, out))
    return {n: r.cpu() for n, r in zip(tv.OP_GRADS, res) if r.numel()}


@pytest.mark.parametrize("dtype, ln, clip, zone, proj",
                         [p for p in tv.FLAG_CASES if p.values[0] in (F64, torch.float32)])
def test_variant_ops_match_reference(dtype, ln, clip, zone, proj):
    """Forward step by step (saved rows, outputs) and every gradient against the float64 reference,
    as on the emulator (cuBLAS's float32 sums for the GEMMs, the GPU's expf/tanhf: still within the
    bounds, which allow the cell type's roundoff)."""
    case = tv.flag_case(dtype, ln, clip, zone, proj, dims=(5, 6, 7, 33, 19))
    fwd, out = forward(case, DEVICE)
    tv.check_forward_steps(case, fwd)
    if dtype == F64:
        tv.check_forward_layer_f64(case, fwd)
    inf, _ = forward(case, DEVICE, training=False)
    for name in ("output", "h_n", "c_n_acc"):
        assert torch.equal(inf[name], fwd[name]), f"inference {name} differs from training's"
    bwd = backward(case, DEVICE, out)
    ref = tv.reference_grads(case, F64)
    for name, got in bwd.items():
        want = ref[name]
        scale = max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= tv.CLOSE[dtype] * scale * 10, f"{name}: error {err:.3g} against float64 autograd"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=tv._id)
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
def test_variant_ops_16bit(dtype, ln):
    """16-bit types against float64: within a small multiple of torch's own error in that dtype."""
    case = tv.VCase(dtype, ln, True, "cmask", True, lengths=True, reverse=False,
                    dims=(5, 6, 7, 33, 19))
    fwd, out = forward(case, DEVICE)
    ref_out, ref_h, ref_c = tv.reference.lstm_variant_layer(
        case.x, case.h0, case.c0, case.w_ih, case.w_hh, case.bias, None, case.w_hr, case.lengths,
        case.reverse, case.zc, case.zh, case.clip, case.ln)
    eps = torch.finfo(dtype).eps
    for name, got, want in [("output", fwd["output"], ref_out), ("h_n", fwd["h_n"], ref_h),
                            ("c_n", fwd["c_n_acc"], ref_c)]:
        err = (got.double() - want).abs().max().item()
        assert err <= 8 * eps * max(1.0, want.abs().max().item()), f"{name}: error {err:.3g}"
    bwd = backward(case, DEVICE, out)
    ref = tv.reference_grads(case, F64)
    own = tv.reference_grads(case, dtype)
    for name, got in bwd.items():
        want = ref[name]
        e = (got.double() - want).abs().max().item()
        c = (own[name] - want).abs().max().item()
        bound = 4 * c + eps * max(1.0, want.abs().max().item())
        assert e <= bound, f"{name}: error {e:.3g}, torch's own in {tv._id(dtype)} is {c:.3g}"


@pytest.mark.skipif(not _has_cpu_variant_op(), reason="the CPU variant op is not built")
@pytest.mark.parametrize("ln, proj", [(False, False), (True, True)], ids=["plain", "ln-proj"])
def test_variant_saved_matches_cpu_op(ln, proj):
    """Both backends fill `saved` (csrc/fastlstm.cpp's layout) the same way."""
    case = tv.VCase(F64, ln, True, "masks", proj, lengths=True, reverse=True, dims=(4, 5, 7, 20, 13))
    cuda, _ = forward(case, DEVICE)
    cpu, _ = forward(case, "cpu")
    for name in cuda:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


def test_variant_ops_bitwise_deterministic():
    case = tv.VCase(torch.float32, True, True, "masks", True, lengths=True, reverse=True,
                    dims=(6, 40, 16, 64, 48))
    runs = []
    for _ in range(2):
        fwd, out = forward(case, DEVICE)
        runs.append({**fwd, **backward(case, DEVICE, out)})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{name} differs between two runs"


def test_variant_gradcheck_cuda():
    """gradcheck in float64 through ops.lstm_variant_layer on the GPU (the op and its autograd)."""
    case = tv.VCase(F64, True, True, "masks", True, lengths=True, reverse=True, dims=(3, 3, 3, 4, 3))
    on = lambda v: v.to(DEVICE).requires_grad_()  # noqa: E731
    x, h0, c0, w_ih, w_hh, b, w_hr = map(on, (case.x, case.h0, case.c0, case.w_ih, case.w_hh,
                                              case.bias, case.w_hr))
    ln = tuple(map(on, case.ln))
    zc, zh, lengths = case.zc.to(DEVICE), case.zh.to(DEVICE), case.lengths.to(DEVICE)

    def f(x, h0, c0, w_ih, w_hh, b, w_hr, *ln):
        return fastlstm.ops.lstm_variant_layer(x, h0, c0, w_ih, w_hh, b, None, w_hr, lengths, True,
                                               zc, zh, case.clip, ln)

    assert torch.autograd.gradcheck(f, (x, h0, c0, w_ih, w_hh, b, w_hr, *ln))


def test_variant_ops_cuda_graph():
    """Forward and backward captured in a CUDA graph replay to the eager results, bitwise: nothing
    in the binding or the layer code synchronises with the host."""
    case = tv.VCase(torch.float32, True, True, "masks", True, lengths=True, reverse=False)
    args = tv.op_args(case, DEVICE)
    fwd_op, bwd_op = _op("lstm_variant_forward"), _op("lstm_variant_backward")
    eager = fwd_op(*args)
    bargs = tv.op_backward_args(case, DEVICE, eager)
    eager_grads = bwd_op(*bargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(2):
            out = fwd_op(*args)
            bwd_op(*bargs[:-2], out[0], out[3])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd_op(*args)
        grads = bwd_op(*bargs[:-2], out[0], out[3])
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(out, eager)):
        assert torch.equal(a, b), f"forward result {i} differs after graph replay"
    for name, a, b in zip(tv.OP_GRADS, grads, eager_grads):
        assert torch.equal(a, b), f"{name} differs after graph replay"

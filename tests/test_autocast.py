"""Autocast: inside torch.autocast fastlstm runs in the autocast dtype, as torch.nn.LSTM does."""
import pytest
import torch

from helpers import make_pair


def _run(module, x, device_type, dtype):
    with torch.autocast(device_type, dtype=dtype):
        out, (h, c) = module(x)
    return out, h, c


def test_cpu_bfloat16_matches_torch_dtypes_and_values():
    fast, ref = make_pair(8, 16, dtype=torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 8, requires_grad=True)
    ours = _run(fast, x, "cpu", torch.bfloat16)
    theirs = _run(ref, x, "cpu", torch.bfloat16)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.bfloat16] * 3
    full = fast(x)[0]
    # Both against the float32 result: ours within a small multiple of torch's own bf16 error.
    err_ours = (ours[0].float() - full).abs().max().item()
    err_theirs = (theirs[0].float() - full).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-2, (err_ours, err_theirs)
    ours[0].float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fast.parameters())


def test_cpu_autocast_under_compile():
    torch._dynamo.reset()
    fast, _ = make_pair(8, 16, dtype=torch.float32)
    x = torch.randn(5, 2, 8)
    compiled = torch.compile(fast, fullgraph=True)
    eager = _run(fast, x, "cpu", torch.bfloat16)
    got = _run(compiled, x, "cpu", torch.bfloat16)
    for a, b in zip(got, eager):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_autocast_off_leaves_float32():
    fast, _ = make_pair(8, 16, dtype=torch.float32)
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert fast(x)[0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_torch_dtypes(dtype):
    fast, ref = make_pair(8, 16, dtype=torch.float32, device="cuda", num_layers=2)
    x = torch.randn(6, 3, 8, device="cuda")
    ours = _run(fast, x, "cuda", dtype)
    theirs = _run(ref, x, "cuda", dtype)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), rtol=5e-2, atol=5e-2)

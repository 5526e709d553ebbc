"""Autocast: inside torch.autocast fastlstm returns what torch.nn.LSTM returns.

torch.nn.LSTM's rules (torch 2.13): padded input runs in the autocast dtype, with every float32,
float16 and bfloat16 tensor cast (input, states, weights; never float64); with proj_size its c_n
comes back float32; a PackedSequence is not autocast at all. The expected dtypes below are those
rules, written out, so the tests mean the same on every host: on CPUs without avx512_bf16 torch's
own LSTM raises under CPU bfloat16 autocast ("could not create a primitive descriptor"), and there
fastlstm runs. Values are checked against a float64 computation from the same rounded inputs, with
a bound relative to torch's own error in bfloat16 (plain bfloat16 modules run on every host)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from helpers import make_pair

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _run(module, x, device_type="cpu", dtype=BF16, hx=None):
    with torch.autocast(device_type, dtype=dtype):
        out, (h, c) = module(x, hx)
    return out, h, c


def _torch_low_error(kwargs, x, state_dict, dtype):
    """torch.nn.LSTM's own error in `dtype` against float64, from the same rounded parameters."""
    ref = nn.LSTM(x.shape[-1], 16, **kwargs)
    ref.load_state_dict(state_dict)
    exact = ref.double()(x.to(dtype).double())[0]
    low = nn.LSTM(x.shape[-1], 16, dtype=dtype, **kwargs)
    low.load_state_dict(state_dict)
    return (low(x.to(dtype))[0].double() - exact).abs().max().item(), exact


# float16 too: torch.nn.LSTM raises under CPU float16 autocast without a projection (no oneDNN
# float16 LSTM); fastlstm runs it.
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True), dict(proj_size=5),
                                    dict(num_layers=2, batch_first=True)])
def test_cpu_low_precision_dtypes_and_error(kwargs, dtype):
    torch.manual_seed(0)
    fast = fastlstm.LSTM(8, 16, **kwargs)
    with torch.no_grad():  # exactly representable parameters: autocast's cast loses nothing
        for p in fast.parameters():
            p.copy_(p.to(dtype))
    x = torch.randn(6, 3, 8, requires_grad=True)
    out, h, c = _run(fast, x, dtype=dtype)
    assert (out.dtype, h.dtype) == (dtype, dtype)
    assert c.dtype == (F32 if kwargs.get("proj_size") else dtype)
    theirs, exact = _torch_low_error(kwargs, x.detach(), fast.state_dict(), dtype)
    ours = (out.double() - exact).abs().max().item()
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == F32
    assert all(p.grad is not None and p.grad.dtype == F32 for p in fast.parameters())


def test_cpu_autocast_mixed_dtypes():
    # Linear -> LSTM under autocast: the LSTM gets bfloat16 input and float32 weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), fastlstm.LSTM(8, 16))
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=BF16):
        out, (h, c) = model(x)
    assert (out.dtype, h.dtype, c.dtype) == (BF16, BF16, BF16)
    torch.testing.assert_close(out.float(), model(x)[0], rtol=5e-2, atol=5e-2)


def test_cpu_autocast_bfloat16_module_float32_input():
    # PyTorch's own test_autocast_rnn case: a bfloat16 module fed float32 input.
    fast = fastlstm.LSTM(8, 16, dtype=BF16)
    out, h, c = _run(fast, torch.randn(5, 2, 8), hx=(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16)))
    assert (out.dtype, h.dtype, c.dtype) == (BF16, BF16, BF16)


def test_cpu_autocast_leaves_float64_and_packed_input_alone():
    fast = fastlstm.LSTM(8, 16, dtype=F64)
    assert [t.dtype for t in _run(fast, torch.randn(5, 2, 8, dtype=F64))] == [F64] * 3
    fast32, ref = make_pair(8, 16, dtype=F32)
    x = torch.randn(5, 2, 8)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    out, h, c = _run(fast32, packed)
    assert (out.data.dtype, h.dtype, c.dtype) == (F32, F32, F32)
    expected = ref(packed)
    torch.testing.assert_close(out.data, expected[0].data, rtol=1e-4, atol=1e-5)


def test_cpu_autocast_under_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    fast, _ = make_pair(8, 16, dtype=F32)
    x = torch.randn(5, 2, 8)
    compiled = torch.compile(fast, fullgraph=True)
    eager = _run(fast, x)
    got = _run(compiled, x)
    for a, b in zip(got, eager):
        assert a.dtype == b.dtype == BF16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_autocast_off_leaves_float32():
    fast, _ = make_pair(8, 16, dtype=F32)
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert fast(x)[0].dtype == F32


def test_op_autocast_casts_like_autocast():
    # The op's own autocast kernel: float32 arguments cast, float64 ones kept.
    x = torch.randn(3, 2, 4)
    args = [x, torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(20, 4), torch.randn(20, 5)]
    with torch.autocast("cpu", dtype=BF16):
        out = torch.ops.fastlstm.lstm_layer_forward(*args, None, None, None, None, False, False)
        assert out[0].dtype == BF16
        out64 = torch.ops.fastlstm.lstm_layer_forward(*[a.double() for a in args], None, None, None,
                                                      None, False, False)
        assert out64[0].dtype == F64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_torch_dtypes(dtype):
    fast, ref = make_pair(8, 16, dtype=F32, device="cuda", num_layers=2)
    x = torch.randn(6, 3, 8, device="cuda")
    ours = _run(fast, x, "cuda", dtype)
    theirs = _run(ref, x, "cuda", dtype)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), rtol=5e-2, atol=5e-2)
    mixed = nn.Sequential(nn.Linear(8, 8, device="cuda"), fast)
    with torch.autocast("cuda", dtype=dtype):
        assert mixed(x)[0].dtype == dtype

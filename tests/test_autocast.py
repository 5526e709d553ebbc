"""Autocast: inside torch.autocast fastlstm returns what torch.nn.LSTM returns.

torch.nn.LSTM's rule on the CPU (torch 2.13) comes from the operations inside it, not from the LSTM
op: where it runs oneDNN (float32 input, or bfloat16 where oneDNN has a bfloat16 LSTM; no
projection; a PackedSequence only with equal batch sizes) everything is cast to the autocast dtype;
elsewhere only its matrix products are, and the cell state follows type promotion
(fastlstm.ops.lstm_autocast_dtypes). test_cpu_autocast_dtype_grid_matches_torch checks the whole
grid against torch.nn.LSTM at run time, and says which combinations torch cannot run on this host
(on CPUs without avx512_bf16 its oneDNN path raises "could not create a primitive descriptor",
where fastlstm runs). The other tests pin common cases: values are checked against a float64
computation from the same rounded inputs, with a bound relative to torch's own error in bfloat16
(plain bfloat16 modules run on every host)."""
import itertools
import warnings

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


# The dtype grid of torch.nn.LSTM under CPU autocast: module dtype x input dtype x state dtype
# (None: the default zeros) x autocast dtype x input kind x proj_size (x one layer, or two
# bidirectional ones). torch's answers are not written down here: each combination is run through
# torch.nn.LSTM on this host and fastlstm must give the same output/h_n/c_n dtypes, or raise the
# same exception type. Its rule depends on the host (whether torch's oneDNN runs 16-bit LSTMs),
# which is why CI runs this file again limited to AVX2.
GRID_DTYPES = [F32, F64, BF16, torch.float16]
INPUT_KINDS = {
    "padded": None,
    "packed": [3, 2],  # unequal batch sizes: torch's step-by-step implementation
    "packed_equal_sizes": [3, 3],  # torch runs it as a padded input
    "padded_onednn_off": None,  # torch.backends.mkldnn.flags(enabled=False)
}


def _grid_outcome(module, x, hx, autocast, kind):
    sizes = INPUT_KINDS[kind]
    inp = pack_padded_sequence(x, torch.tensor(sizes)) if sizes is not None else x
    try:
        with torch.backends.mkldnn.flags(enabled=kind != "padded_onednn_off"), \
                torch.autocast("cpu", dtype=autocast):
            out, (h, c) = module(inp, hx)
    except Exception as e:  # noqa: BLE001 (we compare whatever each raises)
        return e
    return out.data if sizes is not None else out, h, c


def _describe(outcome) -> str:
    if isinstance(outcome, Exception):
        return f"{type(outcome).__name__}: {str(outcome).splitlines()[0][:100]}"
    return str([t.dtype for t in outcome])


def _host_cannot(outcome) -> bool:
    # torch's oneDNN has no LSTM primitive for this dtype on this CPU (e.g. bfloat16 on AVX2).
    return isinstance(outcome, RuntimeError) and "could not create a primitive" in str(outcome)


@pytest.mark.parametrize("autocast", [BF16, torch.float16])
def test_cpu_autocast_lstm_cell_dtypes_match_torch(autocast, one_thread):
    # torch.nn.LSTMCell: cell dtype x input dtype x state dtype (or default), as the LSTM grid.
    mismatches = []
    for module_dtype in GRID_DTYPES:
        torch.manual_seed(0)
        ref = nn.LSTMCell(4, 5, dtype=module_dtype)
        fast = fastlstm.LSTMCell(4, 5, dtype=module_dtype)
        fast.load_state_dict(ref.state_dict())
        for x_dtype, state in itertools.product(GRID_DTYPES, [None, *GRID_DTYPES]):
            x = torch.randn(2, 4).to(x_dtype)
            hx = None if state is None else (torch.randn(2, 5).to(state),
                                             torch.randn(2, 5).to(state))
            outcomes = []
            for cell in (ref, fast):
                try:
                    with torch.autocast("cpu", dtype=autocast):
                        outcomes.append(cell(x, hx))
                except Exception as e:  # noqa: BLE001 (we compare whatever each raises)
                    outcomes.append(e)
            theirs, ours = outcomes
            case = f"cell {module_dtype}, input {x_dtype}, state {state}"
            if isinstance(theirs, Exception) or isinstance(ours, Exception):
                if type(ours) is not type(theirs):
                    mismatches.append(f"{case}: torch {_describe(theirs)}, fastlstm "
                                      f"{_describe(ours)}")
                continue
            if [t.dtype for t in ours] != [t.dtype for t in theirs]:
                mismatches.append(f"{case}: torch {_describe(theirs)}, fastlstm {_describe(ours)}")
            elif not all(torch.allclose(a.double(), b.double(), rtol=0, atol=0.05)
                         for a, b in zip(ours, theirs)):
                mismatches.append(f"{case}: values differ")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:40])


@pytest.mark.parametrize("layers", [(1, False), (2, True)], ids=["one_layer", "two_bidirectional"])
@pytest.mark.parametrize("kind", list(INPUT_KINDS))
@pytest.mark.parametrize("autocast", [BF16, torch.float16])
def test_cpu_autocast_dtype_grid_matches_torch(autocast, kind, layers, one_thread):
    # (one_thread: thousands of tiny calls, which threads would only slow down on a busy host)
    num_layers, bidirectional = layers
    mismatches, host_cannot = [], []
    for module_dtype, proj in itertools.product(GRID_DTYPES, [0, 3]):
        torch.manual_seed(0)
        kw = dict(num_layers=num_layers, bidirectional=bidirectional, proj_size=proj,
                  dtype=module_dtype)
        ref = nn.LSTM(4, 5, **kw)
        fast = fastlstm.LSTM(4, 5, **kw)
        fast.load_state_dict(ref.state_dict())
        for x_dtype, state in itertools.product(GRID_DTYPES, [None, *GRID_DTYPES]):
            x = torch.randn(3, 2, 4).to(x_dtype)
            hx = None
            if state is not None:
                D = num_layers * (2 if bidirectional else 1)
                hx = (torch.randn(D, 2, proj or 5).to(state), torch.randn(D, 2, 5).to(state))
            case = (f"module {module_dtype}, input {x_dtype}, state {state}, proj_size {proj}")
            with warnings.catch_warnings():
                # torch's "projections not supported with oneDNN", and one from mkldnn.flags
                warnings.simplefilter("ignore")
                theirs = _grid_outcome(ref, x, hx, autocast, kind)
                ours = _grid_outcome(fast, x, hx, autocast, kind)
            if _host_cannot(theirs):
                # torch took its oneDNN path, which casts every tensor to the autocast dtype (and
                # returns that on a CPU that runs it); fastlstm runs it so.
                host_cannot.append(case)
                if isinstance(ours, Exception) or any(t.dtype != autocast for t in ours):
                    mismatches.append(f"{case}: torch cannot run it here; fastlstm gave "
                                      f"{_describe(ours)}")
                continue
            if isinstance(theirs, Exception) or isinstance(ours, Exception):
                if type(ours) is not type(theirs):
                    mismatches.append(f"{case}: torch {_describe(theirs)}, fastlstm "
                                      f"{_describe(ours)}")
                continue
            dtypes = [t.dtype for t in ours], [t.dtype for t in theirs]
            if dtypes[0] != dtypes[1]:
                mismatches.append(f"{case}: torch {dtypes[1]}, fastlstm {dtypes[0]}")
                continue
            # The values too, within 16-bit rounding (the two round at different places).
            for a, b in zip(ours, theirs):
                if not torch.allclose(a.double(), b.double(), rtol=0, atol=0.05):
                    mismatches.append(f"{case}: values differ by {(a.double() - b).abs().max()}")
    if host_cannot:
        warnings.warn(f"torch.nn.LSTM cannot run {len(host_cannot)} of these combinations on this "
                      f"host (its oneDNN lacks a {autocast} LSTM); fastlstm's dtypes were checked "
                      f"against the autocast dtype there, e.g. {host_cannot[0]}", UserWarning)
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:40])

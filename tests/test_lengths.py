"""fastlstm.LSTM(input, hx, lengths=...): a padded batch with per-sequence lengths gives what
pack_padded_sequence -> torch.nn.LSTM -> pad_packed_sequence gives (outputs, final states, every
gradient), and exports with torch.export with dynamic batch and sequence length."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from helpers import TOL, make_pair

CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
]
LENGTHS = [[5, 3, 1, 4], [1, 1, 1, 1], [5, 5, 5, 5], [2, 5, 3, 5]]


def _ids(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "plain"


def _losses(out, h, c):
    g = torch.Generator().manual_seed(1)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, h, c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("given_state", [False, True], ids=["default_state", "given_state"])
@pytest.mark.parametrize("lens", LENGTHS, ids=lambda lens: "-".join(map(str, lens)))
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_lengths_match_packed_torch_lstm(config, lens, given_state, dtype):
    fast, ref = make_pair(6, 7, dtype=dtype, **config)
    T, B = 5, len(lens)
    bf = config.get("batch_first", False)
    x = torch.randn((B, T, 6) if bf else (T, B, 6), dtype=dtype, requires_grad=True)
    lengths = torch.tensor(lens)
    hx = None
    if given_state:
        L = fast.num_layers * (2 if fast.bidirectional else 1)
        hx = (torch.randn(L, B, fast.proj_size or 7, dtype=dtype, requires_grad=True),
              torch.randn(L, B, 7, dtype=dtype, requires_grad=True))
    leaves = [x, *(hx or ())]

    out, (h, c) = fast(x, hx, lengths=lengths)
    packed, (rh, rc) = ref(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False),
                           hx)
    rout, _ = pad_packed_sequence(packed, batch_first=bf, total_length=T)
    tol = TOL[dtype]
    for got, want in ((out, rout), (h, rh), (c, rc)):
        torch.testing.assert_close(got, want, **tol)
    grads = torch.autograd.grad(_losses(out, h, c), leaves + list(fast.parameters()))
    ref_grads = torch.autograd.grad(_losses(rout, rh, rc), leaves + list(ref.parameters()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)


def test_lengths_gradcheck():
    model = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])
    torch.autograd.gradcheck(lambda x: model(x, lengths=lengths)[0], (x,))


def test_length_zero_keeps_the_initial_state():
    model = fastlstm.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    hx = (torch.randn(2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64))
    out, (h, c) = model(x, hx, lengths=torch.tensor([0, 3]))
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert torch.equal(out[3:, 1], torch.zeros_like(out[3:, 1]))
    torch.testing.assert_close(h[:, 0], hx[0][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(c[:, 0], hx[1][:, 0], rtol=0, atol=0)
    # Sequence 1 is what running its first 3 steps alone gives.
    out1, (h1, c1) = model(x[:3, 1:], (hx[0][:, 1:], hx[1][:, 1:]))
    torch.testing.assert_close(out[:3, 1:], out1, **TOL[torch.float64])
    torch.testing.assert_close(h[:, 1:], h1, **TOL[torch.float64])


def test_lengths_list_and_device_of_input():
    model = fastlstm.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    a = model(x, lengths=[3, 4])
    b = model(x, lengths=torch.tensor([3, 4], dtype=torch.int32))
    for u, v in zip((a[0], *a[1]), (b[0], *b[1])):
        assert torch.equal(u, v)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.tensor([1.0, 2.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
    (torch.tensor([1, 2, 3]), ValueError, r"lengths must have shape \(2,\)"),
    (torch.tensor([[1, 2]]), ValueError, r"lengths must have shape \(2,\)"),
    (torch.tensor([1, 5]), RuntimeError, r"lengths must lie in \[0, T\]"),
    (torch.tensor([-1, 2]), RuntimeError, r"lengths must lie in \[0, T\]"),
])
def test_bad_lengths(bad, exc, match):
    model = fastlstm.LSTM(3, 4)
    with pytest.raises(exc, match=match):
        model(torch.randn(4, 2, 3), lengths=bad)


def test_lengths_with_packed_or_unbatched_input():
    model = fastlstm.LSTM(3, 4)
    packed = pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="PackedSequence"):
        model(packed, lengths=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="batched"):
        model(torch.randn(4, 3), lengths=torch.tensor([4]))


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_export_dynamic_batch_and_length(batch_first):
    model = fastlstm.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    x = torch.randn((3, 4, 5) if batch_first else (4, 3, 5))
    dims = {0: B, 1: T} if batch_first else {0: T, 1: B}
    with torch.no_grad():
        ep = torch.export.export(model, (x,), {"lengths": torch.tensor([4, 2, 3])},
                                 dynamic_shapes={"input": dims, "lengths": {0: B}})
    for t, lens in ((4, [4, 2, 3]), (9, [9, 1, 5, 7, 2]), (1, [1])):
        b = len(lens)
        x = torch.randn((b, t, 5) if batch_first else (t, b, 5))
        lengths = torch.tensor(lens)
        with torch.no_grad():
            want = model(x, lengths=lengths)
            got = ep.module()(x, lengths=lengths)
        for u, v in zip((got[0], *got[1]), (want[0], *want[1])):
            torch.testing.assert_close(u, v, **TOL[torch.float32])


def test_compile_fullgraph_with_lengths():
    model = fastlstm.LSTM(5, 6, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])
    compiled = torch.compile(model, fullgraph=True)
    out, (h, c) = compiled(x, lengths=lengths)
    want, (wh, wc) = model(x, lengths=lengths)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    torch.testing.assert_close(h, wh, **TOL[torch.float64])
    g, = torch.autograd.grad(out.sum() + h.sum(), x)
    wg, = torch.autograd.grad(want.sum() + wh.sum(), x)
    torch.testing.assert_close(g, wg, **TOL[torch.float64])

"""Shared test helpers: build a fastlstm.LSTM and a torch.nn.LSTM with the same weights, run both,
and compare outputs, states and every gradient."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

# The comparison rule of the suite, shared with benchmarks/bench_lstm.py, which checks every shape
# against torch.nn.LSTM by it before timing the shape (benchmarks/lstm_check.py).
#
# float64 and float32: assert_close at TOL[dtype]. float64: both sides do the same math in a
# different order. float32: differences are rounding, amplified a little by the recurrence.
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def scaled_tol(dtype, want):
    """TOL[dtype] for a tensor that sums over every step and batch row (a weight gradient): its
    rounding grows with its magnitude, so atol is scaled by its largest element (when above 1)."""
    tol = TOL[dtype]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, want.abs().max().item()))


# bfloat16, float16, float32 under TF32, and a float32 result that misses TOL: flash-attention's
# rule. Our largest error against a float64 reference is at most LOW_PRECISION_MULTIPLE times
# torch.nn.LSTM's own error in the same dtype, plus ROUNDING[dtype] at the reference's scale.
LOW_PRECISION_MULTIPLE = 3
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def low_precision_atol(dtype, torch_err, ref):
    """The error allowed against the float64 reference `ref`, given torch.nn.LSTM's own error."""
    return LOW_PRECISION_MULTIPLE * torch_err + ROUNDING[dtype] * max(1.0, ref.abs().max().item())


def make_pair(input_size, hidden_size, dtype=torch.float64, device="cpu", **kwargs):
    ref = torch.nn.LSTM(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    fast = fastlstm.LSTM(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def make_input(T, B, I, dtype, device="cpu", batch_first=False, lengths=None, sorted_=True):
    """Returns (model input, leaf tensor whose grad we compare)."""
    x = torch.randn(B, T, I, dtype=dtype, device=device) if batch_first else torch.randn(
        T, B, I, dtype=dtype, device=device)
    x.requires_grad_(True)
    if lengths is None:
        return x, x
    lengths = torch.as_tensor(lengths)
    return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sorted_), x


def make_hx(module, B, dtype, device="cpu"):
    D = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    h0 = torch.randn(module.num_layers * D, B, P, dtype=dtype, device=device, requires_grad=True)
    c0 = torch.randn(module.num_layers * D, B, module.hidden_size, dtype=dtype, device=device,
                     requires_grad=True)
    return h0, c0


def run(module, inp, hx, leaves):
    """Forward, then the gradients of a loss that weights every output differently."""
    out, (h, c) = module(inp, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator(device=data.device).manual_seed(1)
    loss = ((data * torch.randn(data.shape, generator=g, dtype=data.dtype, device=data.device)).sum()
            + (h * torch.randn(h.shape, generator=g, dtype=h.dtype, device=h.device)).sum()
            + (c * torch.randn(c.shape, generator=g, dtype=c.dtype, device=c.device)).sum())
    wanted = [t for t in leaves if t is not None] + list(module.parameters())
    # The packed input graph is shared by both models being compared.
    grads = torch.autograd.grad(loss, wanted, retain_graph=True)
    return out, h, c, grads


def assert_same(fast_result, ref_result, **tol):
    out_f, h_f, c_f, g_f = fast_result
    out_r, h_r, c_r, g_r = ref_result
    if isinstance(out_r, PackedSequence):
        assert isinstance(out_f, PackedSequence)
        torch.testing.assert_close(out_f.batch_sizes, out_r.batch_sizes)
        for a, b in ((out_f.sorted_indices, out_r.sorted_indices),
                     (out_f.unsorted_indices, out_r.unsorted_indices)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
        out_f, out_r = out_f.data, out_r.data
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(h_f, h_r, **tol)
    torch.testing.assert_close(c_f, c_r, **tol)
    assert len(g_f) == len(g_r)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, **tol)

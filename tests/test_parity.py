"""fastlstm.LSTM against torch.nn.LSTM with the same state_dict: outputs, h_n, c_n and the gradients
of the input, the initial states and every parameter."""
import itertools

import pytest
import torch

from helpers import TOL, assert_same, make_hx, make_input, make_pair, run

GRID = list(itertools.product(
    [1, 2],                        # num_layers
    [False, True],                 # bidirectional
    [0, 3],                        # proj_size
    [True, False],                 # bias
    [False, True],                 # batch_first
    ["padded", "sorted", "unsorted"],
    [True, False],                 # hx given
))


def _ids(p):
    L, bi, proj, bias, bf, mode, hx = p
    return f"L{L}-{'bi' if bi else 'uni'}-proj{proj}-{'bias' if bias else 'nobias'}-" \
           f"{'bf' if bf else 'tf'}-{mode}-{'hx' if hx else 'nohx'}"


def _check(dtype, T, B, I, H, num_layers=1, bidirectional=False, proj_size=0, bias=True,
           batch_first=False, mode="padded", with_hx=True, dropout=0.0):
    fast, ref = make_pair(I, H, dtype=dtype, num_layers=num_layers, bidirectional=bidirectional,
                          proj_size=proj_size, bias=bias, batch_first=batch_first, dropout=dropout)
    lengths = None
    if mode == "sorted":
        lengths = sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True)
        lengths[0] = T
    elif mode == "unsorted":
        lengths = torch.randint(1, T + 1, (B,)).tolist()
    inp, x = make_input(T, B, I, dtype, batch_first=batch_first, lengths=lengths,
                        sorted_=mode == "sorted")
    hx = make_hx(fast, B, dtype) if with_hx else None
    leaves = [x] + (list(hx) if hx else [])
    assert_same(run(fast, inp, hx, leaves), run(ref, inp, hx, leaves), **TOL[dtype])


@pytest.mark.parametrize("config", GRID, ids=[_ids(p) for p in GRID])
def test_grid_float64(config):
    L, bi, proj, bias, bf, mode, hx = config
    _check(torch.float64, 5, 4, 3, 6, L, bi, proj, bias, bf, mode, hx)


@pytest.mark.parametrize("config", GRID[::3], ids=[_ids(p) for p in GRID[::3]])
def test_grid_float32(config):
    L, bi, proj, bias, bf, mode, hx = config
    _check(torch.float32, 7, 5, 8, 16, L, bi, proj, bias, bf, mode, hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,B,I,H", [(1, 3, 4, 5), (6, 1, 4, 5), (1, 1, 1, 1), (9, 7, 13, 11),
                                     (3, 2, 33, 17), (4, 3, 5, 64)])
def test_awkward_shapes(dtype, T, B, I, H):
    _check(dtype, T, B, I, H, num_layers=2, bidirectional=True)
    _check(dtype, T, B, I, H, mode="unsorted" if B > 1 else "sorted")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_layers_proj_packed(dtype):
    _check(dtype, 8, 6, 5, 12, num_layers=3, bidirectional=True, proj_size=5, mode="unsorted")


def test_larger_float32():
    # Vector widths and the row-parallel path (several rows per thread) are exercised.
    _check(torch.float32, 20, 33, 40, 70, num_layers=2, bidirectional=True)
    _check(torch.float32, 20, 33, 40, 70, mode="sorted")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["padded", "sorted", "unsorted"])
def test_wide_batch(dtype, mode):
    # A batch that splits into several row tiles and vector widths, with and without lengths.
    _check(dtype, 9, 33, 12, 40, bidirectional=True, mode=mode)


@pytest.mark.parametrize("dtype,H", [(torch.float32, 256), (torch.float64, 128)])
@pytest.mark.parametrize("mode", ["padded", "unsorted"])
def test_padded_gate_gradient_rows(dtype, H, mode):
    # 4H values fill a multiple of 4 KiB: the backward keeps the gate gradients in rows padded past
    # 4H (NOTES.md entry 35). An input width of 37 leaves partial blocks in every transpose.
    _check(dtype, 5, 17, 37, H, bidirectional=True, mode=mode)


def test_eval_mode_dropout_is_identity():
    fast, ref = make_pair(4, 6, num_layers=3, dropout=0.5)
    fast.eval(), ref.eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL[torch.float64])


def test_training_dropout_between_layers():
    fast, _ = make_pair(4, 6, num_layers=2, dropout=0.5)
    x = torch.randn(5, 64, 4, dtype=torch.float64)
    fast.train()
    a, b = fast(x)[0], fast(x)[0]
    assert not torch.equal(a, b), "dropout between layers must make training outputs random"
    fast.eval()
    torch.testing.assert_close(fast(x)[0], fast(x)[0], rtol=0, atol=0)
    # p=1 zeroes the first layer's output: the second layer then sees zero input.
    fast1, _ = make_pair(4, 6, num_layers=2, dropout=1.0)
    zero_in = fastlstm_second_layer_only(fast1, x)
    torch.testing.assert_close(fast1.train()(x)[0], zero_in, **TOL[torch.float64])


def fastlstm_second_layer_only(module, x):
    import fastlstm
    single = fastlstm.LSTM(module.hidden_size, module.hidden_size, dtype=x.dtype)
    single.weight_ih_l0.data.copy_(module.weight_ih_l1)
    single.weight_hh_l0.data.copy_(module.weight_hh_l1)
    single.bias_ih_l0.data.copy_(module.bias_ih_l1)
    single.bias_hh_l0.data.copy_(module.bias_hh_l1)
    return single(torch.zeros(x.shape[0], x.shape[1], module.hidden_size, dtype=x.dtype))[0]


def test_unbatched_input():
    for kwargs in (dict(), dict(bidirectional=True, proj_size=2)):
        fast, ref = make_pair(4, 6, **kwargs)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        hx = tuple(t[:, 0].detach().requires_grad_() for t in make_hx(fast, 1, torch.float64))
        assert_same(run(fast, x, hx, [x, *hx]), run(ref, x, hx, [x, *hx]), **TOL[torch.float64])
        assert_same(run(fast, x, None, [x]), run(ref, x, None, [x]), **TOL[torch.float64])


def test_batch_size_zero():
    fast, ref = make_pair(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(3, 0, 4, dtype=torch.float64, requires_grad=True)
    out_f, (h_f, c_f) = fast(x)
    out_r, (h_r, c_r) = ref(x)
    assert out_f.shape == out_r.shape and h_f.shape == h_r.shape and c_f.shape == c_r.shape
    out_f.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_size_zero_with_lengths(dtype):
    # An empty batch with (empty) lengths: no rows, nothing to skip (this crashed with a division by
    # zero before).
    fast = make_pair(4, 6, num_layers=2, bidirectional=True)[0].to(dtype)
    for training in (False, True):
        x = torch.randn(3, 0, 4, dtype=dtype, requires_grad=training)
        with torch.set_grad_enabled(training):
            out, (h, c) = fast(x, lengths=torch.zeros(0, dtype=torch.long))
        assert out.shape == (3, 0, 12) and h.shape == c.shape == (4, 0, 6)
        if training:
            out.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_error(dtype):
    """Our error against a float64 reference is at most a small multiple of PyTorch's own error in
    that dtype (bfloat16: torch.nn.LSTM's; float16, which torch's CPU LSTM does not run: torch's
    plain-PyTorch composite in float16, fastlstm.reference)."""
    import fastlstm
    T, B, I, H = 20, 8, 32, 64
    fast64, ref64 = make_pair(I, H, num_layers=2, bidirectional=True)
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    gold = ref64(x64)[0]
    ours = fast64.to(dtype)(x64.to(dtype))[0].double()
    if dtype == torch.bfloat16:
        theirs = ref64.to(dtype)(x64.to(dtype))[0].double()
    else:
        w = [p.to(dtype) for p in ref64.parameters()]
        h = torch.zeros(B, H, dtype=dtype)
        l0f = fastlstm.reference.lstm_layer(x64.to(dtype), h, h, *w[0:4])[0]
        l0b = fastlstm.reference.lstm_layer(x64.to(dtype), h, h, *w[4:8], reverse=True)[0]
        l1 = torch.cat([l0f, l0b], 2)
        theirs = torch.cat([fastlstm.reference.lstm_layer(l1, h, h, *w[8:12])[0],
                            fastlstm.reference.lstm_layer(l1, h, h, *w[12:16], reverse=True)[0]],
                           2).double()
    err_ours = (ours - gold).abs().max().item()
    err_theirs = (theirs - gold).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


@pytest.mark.parametrize("mode", ["padded", "unsorted", "sorted"])
def test_single_thread_path(one_thread, mode):
    # With one thread a step is a single block and a single matmul call (batch 1: the GEMV path).
    for B in (1, 3):
        _check(torch.float32, 9, B, 20, 70, num_layers=2, bidirectional=True,
               mode=mode if B > 1 else "padded")
        _check(torch.float64, 9, B, 20, 70, proj_size=5, mode=mode if B > 1 else "padded")


def test_blas_fallback_path():
    # Where torch's brgemm cannot run (FASTLSTM_CPU_GEMM=blas forces this), the steps use BLAS.
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import torch, test_parity\n"
            "for n in (1, 2):\n"
            "    torch.set_num_threads(n)\n"
            "    test_parity._check(torch.float32, 9, 17, 20, 150, num_layers=2, bidirectional=True,"
            " mode='unsorted')\n"
            "    test_parity._check(torch.float32, 6, 1, 8, 40, proj_size=4)\n"
            "print('ok')\n") % str(Path(__file__).parent)
    env = dict(__import__("os").environ, FASTLSTM_CPU_GEMM="blas")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("B,H,T", [(1, 6, 5), (2, 33, 9), (5, 20, 7), (64, 512, 70)])
def test_inference_path(B, H, T):
    """Without autograd the op saves nothing and projects the input a few steps at a time
    (64 x 512 x 70 spans three such chunks); results stay torch's."""
    dtype = torch.float64 if H < 100 else torch.float32
    for kwargs, mode in ((dict(num_layers=2, bidirectional=True), "unsorted"),
                         (dict(proj_size=3, bidirectional=True), "sorted"),
                         (dict(), "padded")):
        fast, ref = make_pair(H, H, dtype=dtype, **kwargs)
        lengths = None
        if mode != "padded" and B > 1:
            lengths = torch.randint(1, T + 1, (B,)).tolist()
            lengths[0] = T
            if mode == "sorted":
                lengths.sort(reverse=True)
        inp, _ = make_input(T, B, H, dtype, lengths=lengths, sorted_=mode == "sorted")
        with torch.no_grad():
            out_f, (h_f, c_f) = fast(inp)
            out_r, (h_r, c_r) = ref(inp)
        if lengths is not None:
            out_f, out_r = out_f.data, out_r.data
        tol = TOL[dtype]
        torch.testing.assert_close(out_f, out_r, **tol)
        torch.testing.assert_close(h_f, h_r, **tol)
        torch.testing.assert_close(c_f, c_r, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T", [(2, 24, 9), (16, 40, 12), (64, 64, 10)])
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_padding_is_never_read(dtype, B, H, T, order):
    """With lengths, the op projects only each step's running rows (sorted lengths) or ignores the
    projections of finished rows: NaN in the padding must reach no result, and every result is
    bitwise the one with zeros there. The shapes take the input projection's paths: B = 2 (ATen
    product over the gathered rows), B = 16 and 64 (whole-call projection tiles; B = 64 also
    projects block by block in the step loop) in inference and training, float64 (MKL), float32
    and bfloat16 (brgemm where available)."""
    fast = make_pair(H, H, dtype=torch.float32, num_layers=2, bidirectional=True)[0].to(dtype)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0], lengths[-1] = T, 1
    if order == "sorted":
        lengths = lengths.sort(descending=True).values
    pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    x = torch.randn(T, B, H, dtype=dtype)
    x_nan = x.masked_fill(pad.unsqueeze(2), float("nan"))
    x_zero = x.masked_fill(pad.unsqueeze(2), 0.0)
    for training in (False, True):
        results = []
        for inp in (x_nan, x_zero):
            leaf = inp.clone().requires_grad_(training)
            with torch.set_grad_enabled(training):
                out, (h, c) = fast(leaf, lengths=lengths)
            got = [out, h, c]
            if training:
                fast.zero_grad()
                (out.float().sum() + h.float().sum() + c.float().sum()).backward()
                got += [leaf.grad]  # zero at the padding: dG is zero there
                got += [p.grad.clone() for p in fast.parameters()]
            results.append([r.detach() for r in got])
        for i, (a, b) in enumerate(zip(*results)):
            assert not a.isnan().any(), f"training={training}: result {i} has NaN from the padding"
            assert torch.equal(a, b), f"training={training}: result {i} depends on the padding"
        assert not (results[0][0][pad] != 0).any(), "padded outputs must be zero"
        assert not training or not (results[0][3][pad] != 0).any(), "padded input gradients must be zero"


def test_inference_saves_nothing():
    import fastlstm
    x, h = torch.randn(4, 3, 5), torch.zeros(3, 6)
    w_ih, w_hh = torch.randn(24, 5), torch.randn(24, 6)
    out = torch.ops.fastlstm.lstm_layer_forward(x, h, h, w_ih, w_hh, None, None, None, None, False,
                                                False)
    assert [t.numel() for t in out[3:]] == [0, 0, 0]
    full = torch.ops.fastlstm.lstm_layer_forward(x, h, h, w_ih, w_hh, None, None, None, None, False)
    torch.testing.assert_close(out[0], full[0], rtol=0, atol=0)
    assert fastlstm.backend("cpu") == "compiled"

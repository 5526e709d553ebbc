"""The workload compute-sanitizer runs (benchmarks/gpu/run2_sanitize.sh), small but covering every
configuration of the CUDA kernels, and checked against a float64 reference so it is also a quick
correctness test on any device:

  - every batch tile (8, 16 and 32 rows: csrc/kernels/lstm_launch.cuh's with_config picks it from B
    and H), with a ragged last tile of rows and of hidden units, H a multiple of the 16-byte vector
    width and not (both load paths);
  - every dtype (float64, float32, float16, bfloat16);
  - with and without lengths (a length 0, a length 1 and the full length T), forward and reverse,
    with and without projection;
  - forward and backward (fastlstm.ops.lstm_layer under autograd, against fastlstm.reference in
    float64 on the CPU), the inference forward (no grad: training=False), and the module with two
    bidirectional layers, projection and an unsorted packed batch.

    python3 benchmarks/sanitize_small.py                 # on the GPU (the CUDA ops must be built)
    python3 benchmarks/sanitize_small.py --device cpu    # the same workload on the CPU ops

Prints one line per dtype with the largest error (relative to the reference's scale) and exits
non-zero if any result is not finite or is further from the reference than the dtype's tolerance."""
import argparse
import itertools
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import reference

# (B, H, P): the batch tile each gets is batch_tile(B, H). P is the projection size when projecting.
SHAPES = [
    (5, 13, 4),     # 8-row tile, one ragged hidden tile, H not a multiple of 8
    (13, 24, 16),   # 16-row tile (B <= 16), ragged second hidden tile, H a multiple of 8
    (40, 20, 7),    # 16-row tile (B > 16 but few blocks), two row tiles, the last ragged
    (497, 120, 24),  # 32-row tile: 16 row tiles x 8 hidden tiles = 128 blocks, last rows ragged
    (481, 115, 9),  # 32-row tile, H not a multiple of 8
]
T, I = 3, 9
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# float64 and float32: the largest error allowed, relative to max(1, the reference's largest
# magnitude); rounding only. float16 and bfloat16 round every stored gate and state: their error must
# be at most 3x that of the same plain-PyTorch reference (fastlstm.reference) run in that dtype on
# the same device, plus EPS (the rule tests/test_cuda.py applies against cuDNN).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
EPS = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def batch_tile(B, H, tile_n=16):
    """The batch tile with_config in csrc/kernels/lstm_launch.cuh picks (kept in step by hand)."""
    blocks = lambda n, t: -(-n // t)  # noqa: E731
    if B <= 8:
        return 8
    if B <= 16 or blocks(B, 32) * blocks(H, tile_n) < 128:
        return 16
    return 32


def max_rel_err(got, want):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    return (got.double().cpu() - want).abs().max().item() / scale


def run_layer(fn, leaves, lengths, reverse, weights):
    """fn's (output, h_n, c_n) and the gradients of a fixed weighted sum of them, computed in the
    leaves' dtype (float32 for half types), and the no-grad (inference) forward's outputs."""
    out, h, c = fn(*leaves, lengths=lengths, reverse=reverse)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    loss = sum((r.to(acc) * w.to(r.device, acc)).sum() for r, w in zip((out, h, c), weights))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    with torch.no_grad():  # the inference forward (training=False: nothing saved for backward)
        infer = fn(*[t.detach() if t is not None else None for t in leaves], lengths=lengths,
                   reverse=reverse)
    return [out, h, c, *infer, *grads]


def layer_case(device, dtype, B, H, P, proj, with_lengths, reverse, gen):
    """One lstm_layer forward + backward and the inference forward: returns (our error, the plain
    PyTorch reference's error in the same dtype on the same device or None for float32/64), each
    the largest over all outputs and gradients, against the float64 reference on the CPU."""
    Hp = P if proj else H
    shapes = [(T, B, I), (B, Hp), (B, H), (4 * H, I), (4 * H, Hp), (4 * H,), (4 * H,)]
    if proj:
        shapes.append((P, H))
    ref = [torch.randn(*s, dtype=torch.float64, generator=gen) * 0.5 for s in shapes]
    ref += [None] * (8 - len(ref))
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[:3] = torch.tensor([0, 1, T])[: min(3, B)]
    weights = [torch.randn(s, dtype=torch.float64, generator=gen)
               for s in ((T, B, Hp), (B, Hp), (B, H))]

    def leaves(dev, dt):
        return [t.to(dev, dt).requires_grad_() if t is not None else None for t in ref]

    dev_lengths = lengths.to(device) if lengths is not None else None
    want = run_layer(reference.lstm_layer, leaves("cpu", torch.float64), lengths, reverse, weights)
    ours = run_layer(fastlstm.ops.lstm_layer, leaves(device, dtype), dev_lengths, reverse, weights)
    err = max(max_rel_err(a, b.detach()) for a, b in zip(ours, want))
    if dtype not in EPS:
        return err, None
    torch_lp = run_layer(reference.lstm_layer, leaves(device, dtype), dev_lengths, reverse, weights)
    # Per tensor: ours within 3x torch's error plus EPS. Returned as the worst ratio-adjusted margin.
    worst = max(max_rel_err(a, w.detach()) - 3 * max_rel_err(b, w.detach())
                for a, b, w in zip(ours, torch_lp, want))
    return err, worst


def module_case(device, dtype, gen):
    """Two bidirectional layers with projection on an unsorted packed batch (one length 1), batch
    first; every output and gradient finite."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = fastlstm.LSTM(I, 24, num_layers=2, bidirectional=True, proj_size=8,
                      batch_first=True).to(device, dtype)
    B = 19
    x = torch.randn(B, 6, I, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, 7, (B,), generator=gen)
    lengths[3] = 1
    out, (h, c) = m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    loss = out.data.float().square().sum() + h.float().sum() + c.float().sum()
    loss.backward()
    tensors = [out.data, h, c, x.grad] + [p.grad for p in m.parameters()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtypes", default="float64,float32,float16,bfloat16",
                        help="comma-separated subset of the dtypes to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if fastlstm.backend(args.device) != "compiled":
        sys.exit(f"sanitize_small: the {args.device} ops of fastlstm are not built "
                 f"(backend({args.device!r}) = {fastlstm.backend(args.device)!r})")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    tiles = sorted({batch_tile(B, H) for B, H, _ in SHAPES})
    print(f"sanitize_small: device {device}, shapes (B, H, P) {SHAPES}, T={T}, I={I}, "
          f"batch tiles {tiles}")
    assert tiles == [8, 16, 32], tiles
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in dtypes:
        # worst: our largest error; worst_key: what the dtype is judged by (the error, or for half
        # types ours minus 3x torch's), largest over the cases, and where it was.
        worst, worst_key, where, n = 0.0, float("-inf"), None, 0
        for (B, H, P), proj, with_lengths, reverse in itertools.product(
                SHAPES, [False, True], [False, True], [False, True]):
            err, margin = layer_case(device, dtype, B, H, P, proj, with_lengths, reverse, gen)
            n += 1
            worst = err if not err <= worst else worst  # nan propagates
            key = err if margin is None else margin
            if not key <= worst_key:
                worst_key = key
                where = dict(B=B, H=H, P=P if proj else 0, lengths=with_lengths, reverse=reverse)
        finite = module_case(device, dtype, gen)
        if dtype in EPS:
            good = worst_key <= EPS[dtype]
            bound = (f"ours - 3 x torch's {str(dtype)[6:]} error: {worst_key:.2e} "
                     f"(allowed {EPS[dtype]:.0e})")
        else:
            good = worst <= TOL[dtype]
            bound = f"allowed {TOL[dtype]:.0e}"
        good = good and finite
        ok &= good
        print(f"  {str(dtype):15s} {n} layer cases, max error {worst:.2e} ({bound}), worst at "
              f"{where}; module finite: {finite} -> {'ok' if good else 'FAIL'}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize_small:", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

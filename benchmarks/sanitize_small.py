"""A small CUDA workload for compute-sanitizer (benchmarks/gpu_verify.sh): fastlstm.LSTM forward and
backward in float32 and float16, with variable lengths (unsorted, one of length 1), a projection, two
layers and both directions, plus the one-layer op with a length-0 sequence in the reverse direction.
Shapes are small but span several batch and hidden-unit tiles and both load paths (H a multiple of 8
and not). Exits non-zero if a result is not finite."""
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm


def module_step(dtype, H, proj_size, batch_first):
    torch.manual_seed(0)
    m = fastlstm.LSTM(12, H, num_layers=2, bidirectional=True, proj_size=proj_size,
                      batch_first=batch_first).to("cuda", dtype)
    T, B = 6, 19
    x = torch.randn(*((B, T) if batch_first else (T, B)), 12, device="cuda", dtype=dtype,
                    requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[3] = 1
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, (h, c) = m(packed)
    loss = out.data.float().square().sum() + h.float().sum() + c.float().sum()
    loss.backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    return all(torch.isfinite(g).all().item() for g in grads) and torch.isfinite(loss).item()


def layer_step(dtype):
    torch.manual_seed(1)
    T, B, I, H, P = 5, 4, 7, 20, 6
    leaf = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731
    args = (leaf(T, B, I), leaf(B, P), leaf(B, H), leaf(4 * H, I), leaf(4 * H, P), leaf(4 * H),
            leaf(4 * H), leaf(P, H))
    lengths = torch.tensor([5, 0, 3, 1], device="cuda")
    out, h, c = fastlstm.ops.lstm_layer(*args, lengths=lengths, reverse=True)
    grads = torch.autograd.grad(out.float().sum() + h.float().sum() + c.float().sum(), args)
    return all(torch.isfinite(g).all().item() for g in grads)


def main():
    assert fastlstm.backend("cuda") == "compiled", "the CUDA ops are not built"
    ok = True
    for dtype in (torch.float32, torch.float16):
        ok &= module_step(dtype, H=16, proj_size=0, batch_first=False)
        ok &= module_step(dtype, H=13, proj_size=5, batch_first=True)
        ok &= layer_step(dtype)
    torch.cuda.synchronize()
    print("sanitize_small:", "ok" if ok else "NON-FINITE RESULTS")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

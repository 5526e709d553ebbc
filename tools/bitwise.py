"""Bitwise before/after check for refactors of the kernels.

    python tools/bitwise.py dump OUT.pt      # every case's outputs and gradients, this build
    python tools/bitwise.py compare A.pt B.pt

`dump` runs a fixed set of cases chosen so that every CPU code path runs at least once (each
recurrence strategy, the projection variants, the step barrier and the per-step loop, native and
converted bfloat16, float16, float64, packed sorted/unsorted and `lengths=`, bidirectional,
projection, several layers, LSTMCell, and inputs with NaN, +-inf and -0), with 1 and 2 threads,
and saves outputs, final states and every gradient; `compare` compares them bit for bit. Run it
once with the build before a change and once after, under each instruction set the loader can pick (FASTLSTM_CPU_ISA=avx512 / avx2 with ATEN_CPU_CAPABILITY=avx2 and
ONEDNN_MAX_CPU_ISA=AVX2 / generic), then `compare` the pairs: any difference is listed by case and
tensor. `compare` exits 1 on a difference, so it can gate a script.
"""
from __future__ import annotations

import sys
import zlib

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

# (name, dtype, T, B, I, H, module options, lengths or None, packed (sorted) / unsorted / lengths=)
LAYER_CASES = [
    ("dot-rows", torch.float32, 12, 2, 24, 70, {}, None, None),
    ("direct-few-steps", torch.float32, 3, 8, 24, 150, {}, None, None),
    ("panels", torch.float32, 20, 8, 24, 80, {}, None, None),
    ("block-proj", torch.float32, 24, 48, 64, 160, {}, None, None),
    ("block-proj-big", torch.float32, 12, 64, 256, 256, {}, None, None),
    ("wide-h", torch.float32, 6, 16, 128, 520, {}, None, None),
    ("proj", torch.float32, 16, 6, 16, 40, dict(proj_size=24), None, None),
    ("proj-blocks", torch.float32, 10, 40, 48, 96, dict(proj_size=40), None, None),
    ("bidir-2layer-packed", torch.float32, 20, 5, 16, 96, dict(bidirectional=True, num_layers=2),
     [20, 17, 9, 9, 3], "sorted"),
    ("unsorted-packed", torch.float32, 15, 6, 24, 72, dict(bidirectional=True),
     [4, 15, 9, 15, 1, 7], "unsorted"),
    ("lengths-kwarg", torch.float32, 14, 7, 20, 64, dict(bidirectional=True),
     [14, 0, 3, 14, 9, 1, 12], "lengths"),
    ("dropout-3layer", torch.float32, 8, 4, 12, 32, dict(num_layers=3, dropout=0.3), None, None),
    ("batch-first", torch.float32, 9, 3, 10, 20, dict(batch_first=True), None, None),
    ("f64-small", torch.float64, 12, 8, 24, 80, {}, None, None),
    ("f64-wide", torch.float64, 10, 40, 48, 200, dict(bidirectional=True), None, None),
    ("f64-proj-packed", torch.float64, 12, 5, 16, 48, dict(proj_size=20, bidirectional=True),
     [12, 11, 6, 6, 2], "sorted"),
    ("f64-dot-rows", torch.float64, 7, 1, 9, 33, {}, None, None),
    ("bf16", torch.bfloat16, 20, 16, 64, 128, {}, None, None),
    ("bf16-big", torch.bfloat16, 10, 64, 256, 200, {}, None, None),
    ("bf16-dot-rows", torch.bfloat16, 10, 2, 32, 64, {}, None, None),
    ("bf16-odd", torch.bfloat16, 9, 5, 15, 37, {}, None, None),
    ("bf16-proj", torch.bfloat16, 8, 6, 16, 40, dict(proj_size=24), None, None),
    ("bf16-packed-bidir", torch.bfloat16, 12, 6, 32, 64, dict(bidirectional=True),
     [12, 10, 10, 5, 3, 1], "sorted"),
    ("block-proj-packed", torch.float32, 24, 32, 64, 160, {}, sorted(list(range(24, 8, -1)) * 2, reverse=True), "sorted"),
    ("f16", torch.float16, 10, 8, 32, 48, {}, None, None),
    ("f16-dot-rows", torch.float16, 10, 2, 16, 40, {}, None, None),
    ("f16-few-steps", torch.float16, 3, 8, 16, 64, {}, None, None),
    ("f16-proj-lengths", torch.float16, 8, 4, 16, 40, dict(proj_size=16), [8, 2, 5, 7], "lengths"),
    ("special-values", torch.float32, 6, 8, 32, 40, dict(special=True), None, None),
    ("bf16-special-values", torch.bfloat16, 6, 8, 32, 40, dict(special=True), None, None),
]

CELL_CASES = [
    ("cell-f32", torch.float32, 8, 24, 70, True),
    ("cell-bf16-special", torch.bfloat16, 4, 40, 48, True),
    ("cell-f32-nobias", torch.float32, 1, 10, 33, False),
    ("cell-f64", torch.float64, 5, 12, 40, True),
    ("cell-bf16", torch.bfloat16, 6, 16, 48, True),
    ("cell-f16", torch.float16, 3, 8, 20, True),
]


def _special(x):
    # Non-finite and signed-zero inputs, in a few places: their NaN payloads and zero signs must
    # come out as before too.
    with torch.no_grad():
        flat = x.view(-1)
        flat[1::97] = float("nan")
        flat[2::89] = float("inf")
        flat[3::83] = -float("inf")
        flat[4::5] = -0.0
    return x


def _layer_case(name, dtype, T, B, I, H, opts, lengths, kind):
    torch.manual_seed(zlib.crc32(name.encode()))
    opts = dict(opts)
    special = opts.pop("special", False)
    model = fastlstm.LSTM(I, H, dtype=dtype, **opts)
    bf = opts.get("batch_first", False)
    x = torch.randn((B, T, I) if bf else (T, B, I), dtype=dtype)
    x = (_special(x) if special else x).requires_grad_(True)
    D = 2 if opts.get("bidirectional") else 1
    L = opts.get("num_layers", 1)
    P = opts.get("proj_size", 0) or H
    h0 = torch.randn(L * D, B, P, dtype=dtype, requires_grad=True)
    c0 = torch.randn(L * D, B, H, dtype=dtype, requires_grad=True)
    kwargs = {}
    inp = x
    if kind in ("sorted", "unsorted"):
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=bf,
                                   enforce_sorted=kind == "sorted")
    elif kind == "lengths":
        kwargs["lengths"] = torch.tensor(lengths)
    out = {}
    torch.manual_seed(1)  # dropout masks
    model.train()
    o, (h, c) = model(inp, (h0, c0), **kwargs)
    o = getattr(o, "data", o)
    g = torch.Generator().manual_seed(2)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in (o, h, c))
    leaves = [x, h0, c0] + list(model.parameters())
    grads = torch.autograd.grad(loss, leaves)
    out.update(output=o, h_n=h, c_n=c)
    names = ["x", "h0", "c0"] + [n for n, _ in model.named_parameters()]
    out.update({f"grad {n}": gr for n, gr in zip(names, grads)})
    model.eval()
    with torch.no_grad():
        o, (h, c) = model(inp, (h0, c0), **kwargs)
    out.update({"eval output": getattr(o, "data", o), "eval h_n": h, "eval c_n": c})
    return out


def _cell_case(name, dtype, B, I, H, bias):
    torch.manual_seed(zlib.crc32(name.encode()))
    cell = fastlstm.LSTMCell(I, H, bias=bias, dtype=dtype)
    x = torch.randn(B, I, dtype=dtype)
    x = (_special(x) if "special" in name else x).requires_grad_(True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    state = (h0, c0)
    outs = []
    for _ in range(3):
        state = cell(x, state)
        outs.extend(state)
    g = torch.Generator().manual_seed(2)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in outs)
    leaves = [x, h0, c0] + list(cell.parameters())
    grads = torch.autograd.grad(loss, leaves)
    names = ["x", "h0", "c0"] + [n for n, _ in cell.named_parameters()]
    result = {f"step{k // 2} {'hc'[k % 2]}": t for k, t in enumerate(outs)}
    result.update({f"grad {n}": gr for n, gr in zip(names, grads)})
    with torch.no_grad():
        h, c = cell(x, (h0, c0))
    result.update({"nograd h": h, "nograd c": c})
    return result


def dump(path: str) -> None:
    results = {"isa": fastlstm._loader.cpu_isa()}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for case in LAYER_CASES:
                results[f"{case[0]} t{threads}"] = _layer_case(*case)
            for case in CELL_CASES:
                results[f"{case[0]} t{threads}"] = _cell_case(*case)
    finally:
        torch.set_num_threads(before)
    torch.save(results, path)
    print(f"{path}: {len(results) - 1} cases, isa {results['isa']}")


def _same_bytes(t, u) -> bool:
    # Bit for bit: torch.equal would call -0.0 equal to 0.0 and NaN unequal to itself.
    return torch.equal(t.contiguous().view(torch.uint8), u.contiguous().view(torch.uint8))


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    print(f"isa {a.pop('isa')} vs {b.pop('isa')}")
    bad = 0
    for case in a:
        if case not in b:
            print(f"missing in {b_path}: {case}")
            bad += 1
            continue
        for name, t in a[case].items():
            u = b[case].get(name)
            if u is None or t.dtype != u.dtype or t.shape != u.shape or not _same_bytes(t, u):
                diff = (t.double() - u.double()).abs().max().item() if (
                    u is not None and t.shape == u.shape) else float("nan")
                print(f"DIFF {case}: {name} (max abs {diff:.3g})")
                bad += 1
    n = sum(len(v) for v in a.values())
    print(f"{n} tensors in {len(a)} cases: {'all bitwise equal' if bad == 0 else f'{bad} differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"] and len(sys.argv) == 3:
        dump(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)

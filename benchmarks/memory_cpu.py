"""Memory of one CPU training step (forward + backward), torch.nn.LSTM against fastlstm.LSTM.

    python benchmarks/memory_cpu.py                      # fastrnns shape: T=100, B=64, I=H=512
    python benchmarks/memory_cpu.py --T 1000 --B 8 --I 128 --H 128 --layers 2

Each implementation runs in a fresh subprocess so that peaks do not mix. Three numbers each:
  saved for backward   bytes of the distinct storages that autograd saves (saved_tensors_hooks);
                       exact and noise-free, but it counts allocations, not touched pages: on CPU
                       torch.nn.LSTM takes oneDNN's path (MkldnnRnnLayerBackward0), whose saved
                       workspace is larger than what it writes. "activations" leaves out the
                       parameters and the input, which the caller holds anyway.
  graph after forward  RSS growth from just before the forward to just after it (the output plus
                       everything kept for backward)
  step peak            peak RSS (ru_maxrss) during forward + backward, minus RSS just before it
Writes memory_cpu.json to --out (default benchmarks/results/cpu-<date>/).
"""
import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch

import report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def lstm_class(impl_name, module_name):
    return torch.nn.LSTM if impl_name == "torch" else report.load_impl(module_name).LSTM


def training_step(model, x):
    out, (h, c) = model(x)
    (out.sum() + h.sum() + c.sum()).backward()


def saved_bytes(model, x):
    """Bytes of the distinct storages autograd saves during a forward, all and excluding those of
    the parameters and the input."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, (h, c) = model(x)
    held = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    total = sum(storages.values())
    activations = sum(n for ptr, n in storages.items() if ptr not in held)
    (out.sum() + h.sum() + c.sum()).backward()
    return total, activations, len(storages)


def child(args):
    torch.set_num_threads(args.threads)
    cls = lstm_class(args.child, args.impl_module)
    dtype = DTYPES[args.dtype]
    kw = dict(num_layers=args.layers, bidirectional=args.bidirectional)

    # Load libraries, start thread pools and autograd on a tiny LSTM first, so that the measured
    # step only holds what the step itself needs.
    tiny = cls(8, 8, **kw).to(dtype)
    training_step(tiny, torch.randn(2, 2, 8, dtype=dtype, requires_grad=True))
    del tiny

    torch.manual_seed(0)
    model = cls(args.I, args.H, **kw).to(dtype)
    x = torch.randn(args.T, args.B, args.I, dtype=dtype, requires_grad=True)
    gc.collect()
    rss_before = rss_bytes()
    maxrss_before = maxrss_bytes()
    out, (h, c) = model(x)
    rss_forward = rss_bytes()
    grad_fn = type(out.grad_fn).__name__.replace("GeneratedBackwardFor_", "")
    (out.sum() + h.sum() + c.sum()).backward()
    maxrss_after = maxrss_bytes()
    del out, h, c
    model.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    total, activations, count = saved_bytes(model, x)
    result = {
        "impl": args.child,
        "grad_fn": grad_fn,
        "graph_after_forward_bytes": rss_forward - rss_before,
        "step_peak_bytes": maxrss_after - rss_before,
        # The step's peak is hidden when the high-water mark was already above it beforehand.
        "step_peak_hidden": maxrss_after <= maxrss_before,
        "saved_bytes": total,
        "saved_activation_bytes": activations,
        "saved_storages": count,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "input_bytes": x.numel() * x.element_size(),
        "rss_before_bytes": rss_before,
    }
    if args.child != "torch":
        result["fastlstm_backend"] = report.impl_backend(sys.modules[args.impl_module], "cpu")
    print(json.dumps(result))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--I", type=int, default=512)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", help="output folder (default benchmarks/results/cpu-<date>/)")
    p.add_argument("--child", choices=["torch", "fastlstm"], help=argparse.SUPPRESS)
    p.add_argument("--impl-module", default="fastlstm", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    impl = report.load_impl(args.impl_module)
    shape = dict(T=args.T, B=args.B, I=args.I, H=args.H, layers=args.layers, bidirectional=args.bidirectional)
    rows = []
    for name in ("torch", "fastlstm"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--impl-module", args.impl_module]
        cmd += ["--T", str(args.T), "--B", str(args.B), "--I", str(args.I), "--H", str(args.H)]
        cmd += ["--layers", str(args.layers), "--dtype", args.dtype, "--threads", str(args.threads)]
        cmd += ["--bidirectional"] if args.bidirectional else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} subprocess failed:\n{proc.stderr}")
        rows.append(dict(shape, dtype=args.dtype, **json.loads(proc.stdout.strip().splitlines()[-1])))

    header = ["impl", "saved (MiB)", "saved activations (MiB)", "graph after fwd (MiB)", "step peak (MiB)", "node"]
    lines = []
    for r in rows:
        peak = f"{r['step_peak_bytes'] / MIB:.1f}" + (" (hidden)" if r["step_peak_hidden"] else "")
        lines.append(
            [
                "torch.nn.LSTM" if r["impl"] == "torch" else "fastlstm.LSTM",
                f"{r['saved_bytes'] / MIB:.1f}",
                f"{r['saved_activation_bytes'] / MIB:.1f}",
                f"{r['graph_after_forward_bytes'] / MIB:.1f}",
                peak,
                r["grad_fn"],
            ]
        )
    print(
        f"one training step, T={args.T} B={args.B} I={args.I} H={args.H} layers={args.layers}"
        f"{' bidirectional' if args.bidirectional else ''} {args.dtype}, {args.threads} threads"
    )
    print(report.format_table(header, lines, left={0, len(header) - 1}))
    torch_row, fast_row = rows
    def ratio(key):
        return fast_row[key] / max(torch_row[key], 1)

    print(
        f"fastlstm / torch.nn.LSTM: saved activations {ratio('saved_activation_bytes'):.2f}x (allocated), "
        f"graph after forward {ratio('graph_after_forward_bytes'):.2f}x (resident), "
        f"step peak {ratio('step_peak_bytes'):.2f}x"
    )

    device = torch.device("cpu")
    env = report.environment(device, impl)
    env["threads"] = args.threads
    path = os.path.join(args.out or report.default_out_dir(device), "memory_cpu.json")
    report.write_json(path, env, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

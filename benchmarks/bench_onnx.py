"""Inference in onnxruntime of an exported fastlstm.LSTM against eager fastlstm and torch.nn.LSTM (CPU).

    python benchmarks/bench_onnx.py --out benchmarks/results/cpu-zen5-2026-11-29/onnx

For each shape: export fastlstm.LSTM (and torch.nn.LSTM with the same weights) with
`torch.onnx.export(..., dynamo=True)`, run the files in onnxruntime on the CPU with as many intra-op
threads as torch uses, check the outputs against eager fastlstm, and time onnxruntime, eager
fastlstm and eager torch.nn.LSTM in interleaved rounds (medians). Without proj_size the export is an
ONNX LSTM node, which onnxruntime runs as one kernel; with proj_size it is a Scan over time
(docs/deployment.md, ONNX). A torch.nn.LSTM export that onnxruntime refuses is reported as such (the row keeps
its message). Writes onnx.json to --out.
"""
import argparse
import os
import tempfile
import warnings

import torch

import report
import timing

# name, T, B, I, H, proj_size
SHAPES = [
    ("h256-B16", 100, 16, 256, 256, 0),
    ("h512-B16-proj128", 100, 16, 256, 512, 128),
    ("h512-B1-proj128", 100, 1, 256, 512, 128),
    ("h1024-B16-proj256", 50, 16, 512, 1024, 256),
]


def export(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(path)
    return sorted({node.op_type for node in program.model_proto.graph.node})


def session(path, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # onnxruntime's threads otherwise spin after each run, taking the cores from the eager runs
    # interleaved with it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(name, T, B, I, H, proj, rounds, tmp):
    import fastlstm
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, proj_size=proj).eval()
    fast = fastlstm.LSTM(I, H, proj_size=proj).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    row = {"name": name, "T": T, "B": B, "I": I, "H": H, "proj_size": proj}
    runs = {}
    with torch.inference_mode():
        expected = fast(x)[0].numpy()
    for label, model in (("fastlstm_onnx", fast), ("torch_onnx", ref)):
        path = os.path.join(tmp, f"{label}.onnx")
        row[f"{label}_ops"] = export(model, x, path)
        sess = session(path, torch.get_num_threads())
        feeds = {sess.get_inputs()[0].name: x.numpy()}
        try:
            out = sess.run(None, feeds)[0]
        except Exception as e:  # onnxruntime's own error types
            row[f"{label}_error"] = str(e).strip().splitlines()[-1][-300:]
            continue
        row[f"{label}_max_abs_err"] = float(abs(out - expected).max())
        runs[label] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)

    def eager(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    runs["fastlstm_eager"] = eager(fast)
    runs["torch_eager"] = eager(ref)
    for fn in runs.values():
        timing.warm_up(fn, min_calls=3)
    for label, samples in timing.interleaved(runs, rounds, calls=1).items():
        row[f"{label}_ms"] = samples.median * 1e3
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for onnx.json (default: the CPU results folder)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    import onnxruntime
    module = report.load_impl()
    device = torch.device("cpu")
    env = report.environment(device, module)
    env["onnxruntime"] = onnxruntime.__version__
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            row = measure(*shape, args.rounds, tmp)
            rows.append(row)
            f = row["fastlstm_eager_ms"]
            cells = [f"{row['name']:<18}", f"fastlstm eager {f:8.2f} ms"]
            for label in ("fastlstm_onnx", "torch_eager", "torch_onnx"):
                if f"{label}_ms" in row:
                    cells.append(f"{label.replace('_', ' ')} {row[label + '_ms']:8.2f} ms "
                                 f"({f / row[label + '_ms']:.2f}x of fastlstm eager's speed)")
                else:
                    cells.append(f"{label.replace('_', ' ')}: fails in onnxruntime")
            print(" | ".join(cells))
            for label in ("fastlstm_onnx", "torch_onnx"):
                if f"{label}_error" in row:
                    print(f"    {label}: {row[label + '_error']}")
                else:
                    print(f"    {label}: ops {row[label + '_ops']}, max |onnxruntime - fastlstm eager| "
                          f"{row[label + '_max_abs_err']:.2g}")
    path = os.path.join(args.out or report.default_out_dir(device), "onnx.json")
    report.write_json(path, env, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

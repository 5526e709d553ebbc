"""What bench_lstm.py runs: the shapes (the grids and --shape), the dtypes each gets, the two
models with the same weights, one input for both, and the functions that are checked and timed."""
import argparse
import dataclasses

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MODES = ("inference", "training")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    variable_length: bool = False
    P: int = 0  # proj_size
    low_precision_on_cpu: bool = False  # bfloat16 in the CPU grid under --dtype all
    decode: bool = False  # step-by-step decoding: T calls with one timestep each, state carried (inference only)

    @property
    def dirs(self):
        return 2 if self.bidirectional else 1

    def fp16_friendly(self):
        """Where cuDNN's half-precision kernels are at their best (tensor-core multiples)."""
        dims = [self.H, self.I] + ([self.P] if self.P else [])
        return all(d % 128 == 0 for d in dims) and self.B % 8 == 0 and self.B <= 128


# PyTorch's benchmarks/fastrnns default: T=100, B=64, I=H=512, one layer.
GPU_GRID = [
    Shape("fastrnns", 100, 64, 512, 512),
    Shape("4-layers", 100, 64, 512, 512, layers=4),
    Shape("batch1-h512", 100, 1, 512, 512),
    Shape("batch4-h512", 100, 4, 512, 512),
    Shape("batch8-h512", 100, 8, 512, 512),
    Shape("batch1-h1024", 100, 1, 1024, 1024),
    Shape("batch4-h1024", 100, 4, 1024, 1024),
    Shape("batch8-h1024", 100, 8, 1024, 1024),
    Shape("seq1000", 1000, 64, 512, 512),
    Shape("bidir-2-layers", 100, 64, 512, 512, layers=2, bidirectional=True),
    Shape("h128", 100, 64, 128, 128),
    Shape("h2048", 100, 64, 2048, 2048),
    Shape("varlen", 100, 64, 512, 512, variable_length=True),
]

# The same regimes, scaled to run in a few minutes on a 2-core CPU.
CPU_GRID = [
    Shape("fastrnns", 100, 64, 512, 512, low_precision_on_cpu=True),
    Shape("batch1-h128", 100, 1, 128, 128, low_precision_on_cpu=True),
    Shape("batch1-h512", 100, 1, 512, 512, low_precision_on_cpu=True),
    Shape("seq1000", 1000, 8, 128, 128),
    Shape("3-layers", 100, 16, 256, 256, layers=3),
    Shape("bidir-2-layers", 100, 16, 256, 256, layers=2, bidirectional=True),
    Shape("h128", 100, 64, 128, 128),
    Shape("h1024", 100, 16, 1024, 1024),
    Shape("varlen", 100, 64, 256, 256, variable_length=True),
    Shape("decode-h512", 100, 16, 512, 512, decode=True),
]

QUICK_GRID = [
    Shape("quick-small", 50, 16, 128, 128, low_precision_on_cpu=True),
    Shape("quick-batch1", 50, 1, 64, 64),
    Shape("quick-bidir-2-layers", 20, 4, 32, 48, layers=2, bidirectional=True),
    Shape("quick-proj", 20, 8, 32, 64, P=16),
    Shape("quick-varlen", 30, 8, 64, 64, variable_length=True),
]


def plan(grid, dtype_arg, device):
    """(shape, dtype name) pairs to run. Default: float32 on CPU; float32, bfloat16 and float16
    (the last on cuDNN-friendly shapes only) on CUDA. `all` on CPU adds bfloat16 where marked.
    float64 only when named."""
    if dtype_arg is None:
        dtype_arg = ["all"] if device.type == "cuda" else ["float32"]
    if "all" in dtype_arg:
        explicit = None
    else:
        explicit = [d for d in DTYPES if d in dtype_arg]
    items = []
    for shape in grid:
        for dtype in DTYPES:
            if explicit is not None:
                wanted = dtype in explicit and (dtype != "float16" or device.type == "cpu" or shape.fp16_friendly())
            elif device.type == "cuda":
                wanted = dtype in ("float32", "bfloat16") or (dtype == "float16" and shape.fp16_friendly())
            else:
                wanted = dtype == "float32" or (dtype == "bfloat16" and shape.low_precision_on_cpu)
            if wanted:
                items.append((shape, dtype))
    return items


def gate_flops(shape, tokens):
    """Forward FLOPs of the gate matmuls, 2 * tokens * 4H * (input + P) summed over layers and
    directions (a layer above a bidirectional one reads 2P features)."""
    P = shape.P or shape.H
    total = 0
    for layer in range(shape.layers):
        in_features = shape.I if layer == 0 else P * shape.dirs
        total += 2 * tokens * 4 * shape.H * (in_features + P) * shape.dirs
    return total


def parse_shape(text):
    """A Shape from --shape's T,B,I,H[,layers=N][,proj=P][,bidir][,varlen][,decode], named after
    its fields; bfloat16 runs on it under --dtype all, as on the grid's marked shapes."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        T, B, I, H = (int(v) for v in parts[:4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four integers) first, got {text!r}") from None
    kw = dict(low_precision_on_cpu=True)
    flags = {"bidir": "bidirectional", "varlen": "variable_length", "decode": "decode"}
    for opt in parts[4:]:
        key, _, value = opt.partition("=")
        if key in flags and not value:
            kw[flags[key]] = True
        elif key in ("layers", "proj") and value.isdigit():
            kw["layers" if key == "layers" else "P"] = int(value)
        else:
            raise argparse.ArgumentTypeError(f"unknown shape option {opt!r} (layers=N, proj=P, bidir, varlen, decode)")
    if min(T, B, I, H) < 1 or kw.get("layers", 1) < 1:
        raise argparse.ArgumentTypeError(f"T, B, I, H and layers must be positive, got {text!r}")
    name = "-".join([f"T{T}-B{B}-I{I}-H{H}"] + parts[4:])
    return Shape(name, T, B, I, H, **kw)



# ---------------------------------------------------------------------------------------------------
# Models and inputs


def lstm_kwargs(shape):
    kw = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    if shape.P:
        kw["proj_size"] = shape.P
    return kw


def build_models(impl, shape, device, dtype):
    torch.manual_seed(0)
    fast = impl.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=dtype)
    base = torch.nn.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=dtype)
    base.load_state_dict(fast.state_dict())
    base.flatten_parameters()
    return fast, base


class Inputs:
    """One input, shared by both models: a [T, B, I] tensor or a PackedSequence, (h0, c0), and the
    output gradients used for training. `x` is the leaf that gets a gradient."""

    def __init__(self, shape, device, dtype, seed=1):
        g = torch.Generator().manual_seed(seed)
        P = shape.P or shape.H

        def randn(*size):
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        x = randn(shape.T, shape.B, shape.I)
        self.h0 = randn(shape.layers * shape.dirs, shape.B, P)
        self.c0 = randn(shape.layers * shape.dirs, shape.B, shape.H)
        if shape.variable_length:
            # PyTorch fastrnns' variable-length setting: lengths uniform in [30, 100).
            lo, hi = min(30, shape.T), shape.T
            lengths = torch.randint(lo, hi, (shape.B,), generator=g) if hi > lo else torch.full((shape.B,), hi)
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            self.x = packed.data.detach().requires_grad_()
            self.input = PackedSequence(self.x, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            self.tokens = int(lengths.sum())
        else:
            self.x = x.requires_grad_()
            self.input = self.x
            self.tokens = shape.T * shape.B
        out_rows = self.x.shape[0] if shape.variable_length else shape.T
        out_shape = (out_rows, shape.B, P * shape.dirs) if not shape.variable_length else (out_rows, P * shape.dirs)
        self.grad_output = randn(*out_shape)
        self.grad_h_n = randn(*self.h0.shape)
        self.grad_c_n = randn(*self.c0.shape)
        self.decode = shape.decode

    def to(self, dtype):
        """The same values in another dtype (for the float64 reference)."""
        other = object.__new__(Inputs)
        other.x = self.x.detach().to(dtype).requires_grad_()
        if isinstance(self.input, PackedSequence):
            other.input = PackedSequence(
                other.x, self.input.batch_sizes, self.input.sorted_indices, self.input.unsorted_indices
            )
        else:
            other.input = other.x
        for name in ("h0", "c0", "grad_output", "grad_h_n", "grad_c_n"):
            setattr(other, name, getattr(self, name).to(dtype))
        other.tokens = self.tokens
        other.decode = self.decode
        return other


def output_data(out):
    return out.data if isinstance(out, PackedSequence) else out


def decode_steps(model, inp):
    """One call per timestep (x[t:t+1]), the state carried between calls, as a decoder runs."""
    state, outs = (inp.h0, inp.c0), []
    for t in range(inp.x.shape[0]):
        out, state = model(inp.x[t : t + 1], state)
        outs.append(out)
    return torch.cat(outs), state


def run_forward(model, inp):
    with torch.inference_mode():
        out, (h, c) = decode_steps(model, inp) if inp.decode else model(inp.input, (inp.h0, inp.c0))
    return {"output": output_data(out), "h_n": h, "c_n": c}


def run_training(model, inp):
    """Forward and backward; returns outputs and the gradients of the input and every parameter."""
    names, params = zip(*model.named_parameters())
    out, (h, c) = model(inp.input, (inp.h0, inp.c0))
    grads = torch.autograd.grad(
        (output_data(out), h, c), (inp.x,) + params, (inp.grad_output, inp.grad_h_n, inp.grad_c_n)
    )
    result = {"output": output_data(out).detach(), "h_n": h.detach(), "c_n": c.detach(), "grad input": grads[0]}
    result.update({f"grad {n}": g for n, g in zip(names, grads[1:])})
    return result


def step_fn(model, inp, mode):
    """What is timed: a forward under inference_mode, or forward + backward of (output, h_n) with
    respect to the input and all parameters."""
    params = tuple(model.parameters())
    if mode == "inference":

        def step():
            with torch.inference_mode():
                if inp.decode:
                    decode_steps(model, inp)
                else:
                    model(inp.input, (inp.h0, inp.c0))

    else:

        def step():
            out, (h, _) = model(inp.input, (inp.h0, inp.c0))
            torch.autograd.grad((output_data(out), h), (inp.x,) + params, (inp.grad_output, inp.grad_h_n))

    return step


def reference_fn(shape, base, inp, device, mode):
    """torch.nn.LSTM in float64 on the same weights and (rounded) inputs."""

    def ref():
        ref_model = torch.nn.LSTM(shape.I, shape.H, **lstm_kwargs(shape)).to(device=device, dtype=torch.float64)
        ref_model.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
        ref_inp = inp.to(torch.float64)
        out = run_forward(ref_model, ref_inp) if mode == "inference" else run_training(ref_model, ref_inp)
        return out

    return ref


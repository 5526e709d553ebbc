"""Deploying fastlstm: inference graphs that keep nothing for backward (torch.jit.trace,
torch.export, AOTInductor), the op library loaded by a C++ program without Python (examples/cpp),
and the documented status of torch.jit.script and quantize_dynamic."""
import os
import shutil
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlstm

pytestmark = pytest.mark.skipif(fastlstm.backend("cpu") != "compiled",
                                reason="the compiled ops are not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SavedByOp(TorchDispatchMode):
    """Records, for every call of the forward op, the shapes of what it saved for backward
    (gates, cells, hidden)."""

    def __init__(self):
        super().__init__()
        self.saved = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.fastlstm.lstm_layer_forward.default:
            self.saved.append([tuple(t.shape) for t in out[3:]])
        return out


def saved_shapes(fn, *args):
    with SavedByOp() as mode:
        result = fn(*args)
    return result, mode.saved


def model_and_input():
    model = fastlstm.LSTM(8, 16, num_layers=2, bidirectional=True)
    return model, torch.randn(7, 3, 8)


def eager_grads(model, x):
    x = x.clone().requires_grad_()
    out, (h, c) = model(x)
    return torch.autograd.grad((out ** 2).sum() + h.sum(), [x, *model.parameters()])


# --- inference graphs (issue 12, item 3) -----------------------------------------------------------

def test_eager_saves_only_when_a_gradient_is_needed():
    model, x = model_and_input()
    _, saved = saved_shapes(model, x)  # parameters require grad: training step
    assert saved and all(s[0] == (7, 3, 64) for s in saved)
    with torch.no_grad():
        _, saved = saved_shapes(model, x)
    assert saved and all(s == [(0,), (0,), (0,)] for s in saved)
    model.requires_grad_(False)
    _, saved = saved_shapes(model, x)
    assert saved and all(s == [(0,), (0,), (0,)] for s in saved)


def test_trace_in_grad_mode_saves_nothing_for_inference():
    model, x = model_and_input()
    traced = torch.jit.trace(model, (x,))  # captured in grad mode, parameters requiring grad
    with torch.no_grad():
        (out, _), saved = saved_shapes(traced, x)
    assert len(saved) == 4 and all(s == [(0,), (0,), (0,)] for s in saved)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)[0], rtol=0, atol=0)
    # The same trace still trains: it saves, and its gradients are the eager ones.
    _, saved = saved_shapes(traced, x)
    assert all(s[0] == (7, 3, 64) for s in saved)
    for a, b in zip(eager_grads(traced, x), eager_grads(model, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_in_grad_mode_saves_nothing_for_inference():
    model, x = model_and_input()
    ep = torch.export.export(model, (x,))  # grad mode, parameters requiring grad
    with torch.no_grad():
        (out, _), saved = saved_shapes(ep.module(), x)
    assert len(saved) == 4 and all(s == [(0,), (0,), (0,)] for s in saved)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)[0], rtol=0, atol=0)
    _, saved = saved_shapes(ep.module(), x)
    assert all(s[0] == (7, 3, 64) for s in saved)
    # The inference program (what AOTInductor compiles) computes nothing for backward.
    inference = ep.run_decompositions()
    nodes = [n for n in inference.graph.nodes
             if n.target is torch.ops.fastlstm.lstm_layer_forward.default]
    assert len(nodes) == 4
    for n in nodes:
        assert [tuple(v.shape) for v in n.meta["val"][3:]] == [(0,), (0,), (0,)]
    _, saved = saved_shapes(inference.module(), x)
    assert all(s == [(0,), (0,), (0,)] for s in saved)


def test_op_training_argument():
    # None (the default) decides at the Autograd key; an explicit value is honoured.
    args = (torch.randn(3, 2, 4), torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(20, 4),
            torch.randn(20, 5), None, None, None, None, False)
    op = torch.ops.fastlstm.lstm_layer_forward
    assert op(*args)[3].shape == (0,)
    assert op(*args, True)[3].shape == (3, 2, 20)
    w = args[3].clone().requires_grad_()
    out = op(*args[:3], w, *args[4:], False)
    with pytest.raises(RuntimeError, match="training=False"):
        out[0].sum().backward()


# --- C++ without Python (issue 12, item 5) ---------------------------------------------------------

def test_op_library_has_no_python_symbols():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed, so the library's symbols cannot be listed")
    assert len(fastlstm.library_paths()) == 2  # the core library and this CPU's kernels
    for path in fastlstm.library_paths():
        undefined = subprocess.run([nm, "-D", "--undefined-only", path],
                                   capture_output=True, text=True, check=True).stdout
        python_symbols = [line for line in undefined.splitlines()
                          if line.split()[-1].startswith("Py")]
        assert not python_symbols, (path, python_symbols[:5])


@pytest.fixture(scope="module")
def cpp_runner(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++ or $CXX) to build examples/cpp/fastlstm_run.cpp")
    out = tmp_path_factory.mktemp("cpp") / "fastlstm_run"
    subprocess.run(["bash", os.path.join(ROOT, "examples", "cpp", "build.sh"), str(out)],
                   check=True, capture_output=True, text=True, env={**os.environ, "CXX": cxx})
    return str(out)


def run_cpp(runner, mode, model_path, x, tmp_path):
    torch.save(x, tmp_path / "input.pt")
    # An empty environment: no PYTHONPATH, no Python of any kind in the process.
    result = subprocess.run(
        [runner, mode, ":".join(fastlstm.library_paths()), str(model_path), str(tmp_path / "input.pt"),
         str(tmp_path / "result.pt")], capture_output=True, text=True, env={}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(tmp_path / "result.pt")


def test_cpp_program_does_not_link_python(cpp_runner):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not installed")
    libs = subprocess.run([ldd, cpp_runner], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in libs and "torch_python" not in libs, libs


def test_cpp_runs_traced_model_forward_and_backward(cpp_runner, tmp_path):
    model = fastlstm.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4)
    x = torch.randn(7, 3, 8)
    torch.jit.trace(model, (x,)).save(str(tmp_path / "model.pt"))
    got = run_cpp(cpp_runner, "traced", tmp_path / "model.pt", x, tmp_path)
    xg = x.clone().requires_grad_()
    out, (h, c) = model(xg)
    ((out ** 2).sum() + h.sum() + c.sum()).backward()
    expected = [out.detach(), xg.grad, *(p.grad for p in model.parameters())]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpp_runs_aoti_package_with_dynamic_shapes(cpp_runner, tmp_path):
    model, x = model_and_input()
    dims = ({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},)
    ep = torch.export.export(model, (x,), dynamic_shapes=dims)
    package = torch._inductor.aoti_compile_and_package(
        ep, package_path=str(tmp_path / "model.pt2"))
    x2 = torch.randn(11, 5, 8)  # another length and batch than exported with
    got = run_cpp(cpp_runner, "aoti", package, x2, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(x2)[0], rtol=1e-6, atol=1e-7)


# --- TorchScript scripting and dynamic quantization (issue 12, item 7) -----------------------------

def test_script_raises_a_clear_error():
    model = torch.nn.Sequential(fastlstm.LSTM(4, 8))
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(model)


def test_quantize_dynamic_leaves_fastlstm_in_float_as_documented():
    # docs/deployment.md: quantize_dynamic does not convert fastlstm.LSTM (it is not a torch.nn.LSTM).
    model = torch.nn.Sequential(fastlstm.LSTM(4, 8), torch.nn.Linear(8, 2))
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear})
    assert type(q[0]) is fastlstm.LSTM and q[0].weight_ih_l0.dtype == torch.float32
    assert type(q[1]) is not torch.nn.Linear  # what it can convert, it converts


def test_replace_lstm_leaves_a_quantized_lstm_alone():
    # docs/deployment.md: for an int8 LSTM, quantize the torch.nn.LSTM model; replace_lstm then keeps it.
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(4, 8)),
                                               {torch.nn.LSTM})
    x = torch.randn(5, 2, 4)
    before = q(x)[0]
    fastlstm.replace_lstm(q)
    assert type(q[0]) is torch.ao.nn.quantized.dynamic.LSTM
    torch.testing.assert_close(q(x)[0], before, rtol=0, atol=0)

"""fastlstm.LSTM as a torch.nn.LSTM for its users: construction, parameters, state_dict, conversions,
replace_lstm, and which backend runs."""
import copy
import os

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import ops

CONFIGS = [dict(), dict(num_layers=3, bidirectional=True), dict(proj_size=3, bias=False),
           dict(num_layers=2, proj_size=2, bidirectional=True, batch_first=True, dropout=0.25)]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_parameters_and_init_as_torch(kwargs):
    torch.manual_seed(123)
    ref = nn.LSTM(5, 7, **kwargs)
    torch.manual_seed(123)
    fast = fastlstm.LSTM(5, 7, **kwargs)
    ref_params, fast_params = dict(ref.named_parameters()), dict(fast.named_parameters())
    assert list(ref_params) == list(fast_params)
    for name, p in ref_params.items():
        assert torch.equal(p, fast_params[name]), name
    assert [[w.shape for w in layer] for layer in fast.all_weights] == \
           [[w.shape for w in layer] for layer in ref.all_weights]
    assert repr(fast) == repr(ref)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_state_dict_loads_both_ways_strictly(kwargs):
    ref, fast = nn.LSTM(5, 7, **kwargs), fastlstm.LSTM(5, 7, **kwargs)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref2 = nn.LSTM(5, 7, **kwargs)
    ref2.load_state_dict(fast.state_dict(), strict=True)
    for a, b in zip(ref.parameters(), ref2.parameters()):
        assert torch.equal(a, b)


def test_is_not_a_torch_lstm_but_an_rnnbase():
    m = fastlstm.LSTM(3, 4)
    assert not isinstance(m, nn.LSTM)
    assert isinstance(m, nn.RNNBase) and m.mode == "LSTM"


def test_flatten_parameters_is_harmless():
    m = fastlstm.LSTM(3, 4, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.flatten_parameters()
    x = torch.randn(2, 1, 3)
    out = m(x)[0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert out.shape == (2, 1, 4)


@pytest.mark.parametrize("convert,dtype", [
    (lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16), (lambda m: m.to(torch.float64), torch.float64),
    (lambda m: m.float(), torch.float32),
])
def test_dtype_conversions(convert, dtype):
    m = convert(fastlstm.LSTM(3, 4, 2, bidirectional=True))
    assert all(p.dtype == dtype for p in m.parameters())
    out, (h, c) = m(torch.randn(5, 2, 3, dtype=dtype))
    assert out.dtype == h.dtype == c.dtype == dtype
    assert torch.isfinite(out).all()


def test_weight_replacement_is_seen():
    # Users (and weight_norm-like utilities) assign new parameters; the forward must use them.
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    m = fastlstm.LSTM(3, 4, dtype=torch.float64)
    m.weight_hh_l0 = nn.Parameter(ref.weight_hh_l0.detach().clone())
    m.weight_ih_l0 = nn.Parameter(ref.weight_ih_l0.detach().clone())
    m.bias_ih_l0 = nn.Parameter(ref.bias_ih_l0.detach().clone())
    m.bias_hh_l0 = nn.Parameter(ref.bias_hh_l0.detach().clone())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], ref(x)[0])


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(4, 8, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LSTM(8, 8, 2, dropout=0.1), nn.Identity())])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, _ = self.blocks[0][0](y.transpose(0, 1))
        return self.head(y)


def test_replace_lstm_keeps_weights_mode_and_results():
    model = Model().double()
    model.blocks[0][0].weight_hh_l1.requires_grad_(False)
    model.eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = model(x)
    params = {n: p for n, p in model.named_parameters()}
    frozen = model.blocks[0][0].weight_hh_l1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fastlstm.replace_lstm(model) is model
    assert isinstance(model.encoder, fastlstm.LSTM) and isinstance(model.blocks[0][0], fastlstm.LSTM)
    assert not any(isinstance(m, nn.LSTM) for m in model.modules())
    assert not model.training and not model.encoder.training
    assert model.encoder.batch_first and model.blocks[0][0].dropout == 0.1
    assert model.blocks[0][0].weight_hh_l1 is frozen and not frozen.requires_grad
    for name, p in model.named_parameters():
        assert p is params[name], name  # the same Parameter objects: the optimizer still holds them
    torch.testing.assert_close(model(x), expected)
    # The optimizer built before the swap trains the swapped model.
    model.train()
    model(x).sum().backward()
    before = model.encoder.weight_ih_l0.detach().clone()
    optimizer.step()
    assert not torch.equal(model.encoder.weight_ih_l0, before)


def test_replace_lstm_on_a_bare_lstm_and_device_dtype():
    lstm = nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    fast = fastlstm.replace_lstm(lstm)
    assert isinstance(fast, fastlstm.LSTM)
    assert fast.weight_ih_l0_reverse.dtype == torch.float64
    assert fast.weight_ih_l0.device == lstm.weight_ih_l0.device
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], lstm(x)[0])


def test_deepcopy_and_train_eval():
    m = fastlstm.LSTM(3, 4, 2, dropout=0.5)
    m2 = copy.deepcopy(m)
    m2.eval()
    x = torch.randn(3, 2, 3)
    torch.testing.assert_close(m2(x)[0], m.eval()(x)[0])


def test_backend_reports_compiled_on_cpu():
    assert fastlstm.backend("cpu") == "compiled", fastlstm._loader.load_error()
    assert fastlstm.backend(torch.device("cpu")) == "compiled"
    assert fastlstm.backend("meta") == "compiled"


def test_reference_fallback_gives_the_same_results(monkeypatch):
    fast, x = fastlstm.LSTM(4, 5, 2, bidirectional=True, proj_size=3, dtype=torch.float64), None
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    out, (h, c) = fast(x)
    grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), [x, *fast.parameters()])
    monkeypatch.setitem(ops._COMPILED, "cpu", False)
    monkeypatch.setattr(ops, "_warned_devices", set())
    with pytest.warns(RuntimeWarning, match="reference"):
        out_r, (h_r, c_r) = fast(x)
    assert fastlstm.backend("cpu") == "reference"
    grads_r = torch.autograd.grad(out_r.sum() + h_r.sum() + c_r.sum(), [x, *fast.parameters()])
    torch.testing.assert_close(out_r, out)
    for a, b in zip(grads_r, grads):
        torch.testing.assert_close(a, b)


def test_import_without_compiled_ops_warns_and_uses_reference(tmp_path):
    # A checkout that was never built: the package's Python files without its libraries. fastlstm
    # imports, warns once, and runs on the reference.
    import shutil
    import subprocess
    import sys
    shutil.copytree(os.path.dirname(fastlstm.__file__), tmp_path / "fastlstm",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastlstm\n"
            "assert any('reference' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "assert fastlstm.backend('cpu') == 'reference'\n"
            "assert 'no _C.abi3.so' in fastlstm._loader.load_error()\n"
            "m = fastlstm.LSTM(3, 4, 2); r = torch.nn.LSTM(3, 4, 2); r.load_state_dict(m.state_dict())\n"
            "x = torch.randn(5, 2, 3)\n"
            "torch.testing.assert_close(m(x)[0], r(x)[0], rtol=1e-5, atol=1e-6)\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr

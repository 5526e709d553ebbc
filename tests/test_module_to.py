"""Module.to() with and without swapped tensors (torch.__future__.set_swap_module_params_on_conversion),
as PyTorch's own ModuleInfo `test_to` checks nn.LSTM and nn.LSTMCell, on torch's sample inputs for those
modules. Swapping a parameter (torch.utils.swap_tensors) needs it to have no references beyond its
module's and its AccumulateGrad node's: FSDP2/DTensor and load_state_dict(assign=True) flows rely on it.
"""
import itertools

import pytest
import torch
from torch.testing._internal.common_modules import module_db

import fastlstm

_INFOS = {info.module_cls: info for info in module_db if info.module_cls in (torch.nn.LSTM, torch.nn.LSTMCell)}
_FAST = {torch.nn.LSTM: fastlstm.LSTM, torch.nn.LSTMCell: fastlstm.LSTMCell}


@pytest.fixture
def swap_setting():
    before = torch.__future__.get_swap_module_params_on_conversion()
    yield torch.__future__.set_swap_module_params_on_conversion
    torch.__future__.set_swap_module_params_on_conversion(before)


def _fresh_parameters(m, set_grad):
    # The module's parameters replaced without Module.to (the method under test).
    for name, p in list(m.named_parameters(recurse=False)):
        new = torch.nn.Parameter(p.detach().clone())
        setattr(m, name, new)
        if set_grad:
            new.grad = torch.randn_like(new)


@pytest.mark.parametrize("torch_cls", [torch.nn.LSTM, torch.nn.LSTMCell], ids=lambda c: c.__name__)
@pytest.mark.parametrize("swap,set_grad", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("training", [True, False])
def test_to(torch_cls, swap, set_grad, training, swap_setting):
    info = _INFOS[torch_cls]
    swap_setting(swap)
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                      training=training)
    for sample in samples:
        m = _FAST[torch_cls](*sample.constructor_input.args, **sample.constructor_input.kwargs)
        m.train(training)
        _fresh_parameters(m, set_grad)
        if swap and not set_grad:
            # .to() after a forward and backward: nothing may still hold the parameters.
            out = m(*sample.forward_input.args, **sample.forward_input.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            m.to(dtype=torch.half)
            assert all(p.dtype == torch.half for p in m.parameters())
            m.to(dtype=torch.float32)
        prev = torch.float32
        for dtype in info.dtypes:
            same = dtype == prev
            prev = dtype
            ids = [id(p) for p in m.parameters()]
            cdatas = [p._cdata for p in m.parameters()]
            g_ids = [id(p.grad) for p in m.parameters()] if set_grad else []
            g_cdatas = [p.grad._cdata for p in m.parameters()] if set_grad else []
            m.to(device="cpu", dtype=dtype)
            params = list(m.parameters())
            assert all(isinstance(p, torch.nn.Parameter) and p.dtype == dtype for p in params)
            assert [id(p) for p in params] == ids
            if set_grad:
                assert all(p.grad.dtype == dtype for p in params)
            if swap:
                assert all(a != b for a, b in zip(cdatas, (p._cdata for p in params)))
                if set_grad:
                    assert all((a == b) == same for a, b in zip(g_cdatas, (p.grad._cdata for p in params)))
            else:
                assert [p._cdata for p in params] == cdatas
                if set_grad:
                    assert [p.grad._cdata for p in params] == g_cdatas
                    assert [id(p.grad) for p in params] == g_ids


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=2)],
                         ids=["plain", "2-layers-bidir", "proj"])
def test_swap_after_backward_converts_whole_module(kwargs, swap_setting):
    # The case: Module.to(float64) with swapped tensors after one training step.
    swap_setting(True)
    for cls in (fastlstm.LSTM, torch.nn.LSTM):
        torch.manual_seed(0)
        m = cls(3, 4, **kwargs)
        loss = m(torch.randn(2, 1, 3))[0].sum()
        loss.backward()
        m.to(torch.float64)  # `loss` (and its graph) still alive
        assert all(p.dtype == torch.float64 for p in m.parameters()), cls
        out, _ = m(torch.randn(2, 1, 3, dtype=torch.float64))
        assert out.dtype == torch.float64


def test_double_backward_with_retained_graph_still_sees_biases():
    # Biases are released with the saved tensors, not before: a retained graph can still be
    # differentiated twice (the double backward recomputes the layer from them).
    m = fastlstm.LSTM(3, 4, dtype=torch.float64)
    ref = torch.nn.LSTM(3, 4, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (m, ref):
        out = module(x)[0]
        out.pow(2).sum().backward(retain_graph=True)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gb = torch.autograd.grad(gx.pow(2).sum(), module.bias_ih_l0)[0]
        results.append(gb)
    torch.testing.assert_close(results[0], results[1])

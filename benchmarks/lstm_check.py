"""Whether fastlstm matches torch.nn.LSTM, checked by bench_lstm.py before it times a shape. The rule
is the test suite's (tests/helpers.py: TOL, scaled_tol, low_precision_atol), so that a shape the
benchmark times is one the tests would pass."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import LOW_PRECISION_MULTIPLE, TOL, low_precision_atol, scaled_tol  # noqa: E402


def direct_rule(dtype, device, tf32):
    """TOL[dtype] where fastlstm is compared with torch.nn.LSTM directly (float64; float32 unless
    either side may round to TF32 on CUDA), else None: the float64-reference rule only."""
    if dtype == torch.float64 or (dtype == torch.float32 and not (device.type == "cuda" and tf32)):
        return TOL[dtype]
    return None


def check(impl_out, base_out, ref_fn, dtype, device, tf32):
    """Whether fastlstm's outputs and gradients (impl_out) match torch.nn.LSTM's (base_out), both
    {name: tensor}. Returns (ok, rule, detail).

    float64, and float32 without TF32: assert_close(fast, torch) at TOL[dtype], atol scaled by the
    tensor's magnitude for gradients (sums over T*B). If that fails, and for bfloat16/float16/TF32
    always, the low-precision rule against a float64 torch.nn.LSTM (ref_fn() runs it)."""
    missing = sorted(set(base_out) ^ set(impl_out))
    if missing:
        return False, "names", f"outputs/gradients present in only one implementation: {missing}"
    tol = direct_rule(dtype, device, tf32)
    direct_failure = None
    if tol is not None:
        try:
            for key, b in base_out.items():
                t = scaled_tol(dtype, b) if key.startswith("grad") else tol
                torch.testing.assert_close(impl_out[key], b, **t, msg=lambda m, k=key: f"{k}: {m}")
            return True, f"direct rtol={tol['rtol']:g} atol={tol['atol']:g}", ""
        except AssertionError as e:
            direct_failure = str(e).splitlines()[0]
    ref_out = ref_fn()
    worst = ""
    worst_ratio = 0.0
    try:
        for key, r in ref_out.items():
            b = base_out[key].double()
            f = impl_out[key].double()
            base_err = (b - r).abs().max().item()
            atol = low_precision_atol(dtype, base_err, r)
            fast_err = (f - r).abs().max().item()
            if fast_err / atol > worst_ratio:
                worst_ratio = fast_err / atol
                worst = f"{key}: fastlstm err {fast_err:.3g}, torch err {base_err:.3g}"
            torch.testing.assert_close(f, r, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    except AssertionError as e:
        detail = str(e).splitlines()[0]
        if direct_failure:
            detail = f"{direct_failure}; vs float64: {detail}"
        return False, "vs float64", detail
    rule = f"vs float64 (<= {LOW_PRECISION_MULTIPLE}x torch error)"
    detail = worst
    if direct_failure:
        detail = f"direct check failed ({direct_failure}); passed {rule}. worst {worst}"
    return True, rule, detail

"""CPU kernel selection: results that do not depend on the thread count, and (below) the run-time
choice of the instruction set."""
import pytest
import torch

import fastlstm
from helpers import make_input, run

# Each case takes a different path through the recurrent matmul (csrc/cpu/lstm_cpu.cpp).
THREAD_CASES = [
    dict(T=20, B=8, I=24, H=80),  # per-block panels of w_hh, the last block partial
    dict(T=3, B=8, I=24, H=150),  # few steps: w_hh read in place
    dict(T=20, B=2, I=24, H=70),  # dot products with w_hh's rows
    dict(T=20, B=6, I=16, H=40, proj_size=24),
    dict(T=20, B=5, I=16, H=96, bidirectional=True, num_layers=2, lengths=[20, 17, 9, 9, 3]),
    dict(T=40, B=48, I=64, H=160),  # steps big enough to be split among threads
]


@pytest.mark.parametrize("case", THREAD_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_float64_results_do_not_depend_on_thread_count(case):
    # torch.nn.LSTM gives bitwise the same float64 outputs and gradients with 1, 2 or 3 threads; so
    # must fastlstm (its blocks of hidden units are sized by H alone, never by the thread count).
    # float32 is not asserted: the input and w_ih gradients are MKL GEMMs (at::mm), whose float32
    # summation order changes with the thread count.
    case = dict(case)
    T, B, I, H = (case.pop(k) for k in "TBIH")
    lengths = case.pop("lengths", None)
    model = fastlstm.LSTM(I, H, dtype=torch.float64, **case)
    inp, x = make_input(T, B, I, torch.float64, lengths=lengths)
    D = 2 if model.bidirectional else 1
    hx = (torch.randn(model.num_layers * D, B, model.proj_size or H, dtype=torch.float64),
          torch.randn(model.num_layers * D, B, H, dtype=torch.float64))
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, h, c, grads = run(model, inp, hx, [x])
            results[threads] = [getattr(out, "data", out), h, c, *grads]
    finally:
        torch.set_num_threads(before)
    names = ["output", "h_n", "c_n", "grad input"] + [f"grad {n}" for n, _ in model.named_parameters()]
    for threads in (2, 3):
        for name, a, b in zip(names, results[1], results[threads]):
            assert torch.equal(a, b), (
                f"{name}: {threads} threads differ from 1 by {(a - b).abs().max().item():.3g}")

"""Bad input raises what torch.nn.LSTM raises: the same exception type, and where torch's own
message names the problem, the same message."""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm


def outcome(fn, module):
    try:
        fn(module)
    except Exception as e:  # noqa: BLE001 (we compare whatever each raises)
        return type(e), str(e)
    return None, None


FORWARD_CASES = {
    "zero-length sequence": lambda m: m(torch.randn(0, 2, 4)),
    "4-D input": lambda m: m(torch.randn(1, 2, 3, 4)),
    "1-D input": lambda m: m(torch.randn(4)),
    "wrong feature size": lambda m: m(torch.randn(3, 2, 5)),
    "wrong h0 batch": lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 3, 6), torch.randn(1, 2, 6))),
    "wrong c0 size": lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 7))),
    "wrong h0 layers": lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 2, 6), torch.randn(1, 2, 6))),
    "2-D state for 3-D input": lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 6), torch.randn(2, 6))),
    "3-D state for 2-D input": lambda m: m(torch.randn(3, 4), (torch.randn(1, 1, 6), torch.randn(1, 1, 6))),
    "input dtype != weights": lambda m: m(torch.randn(3, 2, 4).double()),
    "integer input": lambda m: m(torch.ones(3, 2, 4, dtype=torch.long)),
    "packed zero length": lambda m: m(pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 0]))),
}
# Where torch's message comes from its kernel internals (oneDNN, a matmul, a broadcast), ours names
# the argument instead; the exception type is still torch's.
OWN_MESSAGE = {
    "packed wrong feature size": (
        lambda m: m(pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 2]))),
        "input.size\\(-1\\) must be equal to input_size. Expected 4, got 5"),
    "h0 dtype": (lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 2, 6).double(), torch.randn(1, 2, 6))),
                 "Input and hidden tensors are not the same dtype"),
    "c0 dtype": (lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6).double())),
                 "Input and hidden tensors are not the same dtype"),
    "hx with three tensors": (lambda m: m(torch.randn(3, 2, 4), (torch.zeros(1, 2, 6),) * 3),
                              "lstm expects two hidden states"),
    "packed hx with one tensor": (
        lambda m: m(pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2])),
                    (torch.zeros(1, 2, 6),)),
        "lstm expects two hidden states"),
    "hx as one stacked tensor": (lambda m: m(torch.randn(3, 2, 4), torch.zeros(2, 1, 2, 6)),
                                 "hx must be a tuple of two tensors"),
    "packed data of another dtype": (
        lambda m: m(_packed(torch.randn(3, 2, 4), data=lambda d: d.double())),
        "Input and parameter tensors are not the same dtype"),
    "int32 batch_sizes": (lambda m: m(_packed(torch.randn(3, 2, 4), sizes=torch.int32)),
                          "batch_sizes must be an int64 tensor"),
    "float batch_sizes": (lambda m: m(_packed(torch.randn(3, 2, 4), sizes=torch.float32)),
                          "batch_sizes must be an int64 tensor"),
    "a weight set to None": (lambda m: m(torch.randn(3, 2, 4)) if _set_none(m) else None,
                             "expected Tensor as element 1 in argument 2 .*weight_hh_l0"),
    "packed wrong h0 batch": (lambda m: m(pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2])),
                                          (torch.randn(1, 3, 6), torch.randn(1, 3, 6))),
                              r"Expected hidden\[0\] size \(1, 2, 6\), got \[1, 3, 6\]"),
}


def _packed(x, data=lambda d: d, sizes=torch.int64):
    p = pack_padded_sequence(x, torch.tensor([3, 2]))
    return PackedSequence(data(p.data), p.batch_sizes.to(sizes), p.sorted_indices, p.unsorted_indices)


def _set_none(m):
    m.weight_hh_l0 = None
    return True


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_errors_match_torch(case):
    fn = FORWARD_CASES[case]
    theirs = outcome(fn, torch.nn.LSTM(4, 6))
    ours = outcome(fn, fastlstm.LSTM(4, 6))
    assert theirs[0] is not None, "torch accepts this input: the case is wrong"
    assert ours == theirs


@pytest.mark.parametrize("case", list(OWN_MESSAGE))
def test_forward_errors_same_type_clear_message(case):
    fn, message = OWN_MESSAGE[case]
    their_type, _ = outcome(fn, torch.nn.LSTM(4, 6))
    assert their_type is not None
    with pytest.raises(their_type, match=message):
        fn(fastlstm.LSTM(4, 6))


@pytest.mark.parametrize("kwargs", [
    dict(proj_size=-1), dict(proj_size=6), dict(proj_size=1.5), dict(dropout=1.5), dict(dropout=-0.1),
    dict(dropout=True), dict(num_layers=0), dict(num_layers=1.5), dict(hidden_size=0),
    dict(hidden_size=2.5), dict(input_size=0), dict(bias="yes"), dict(batch_first=1),
    dict(bidirectional="no"),
])
def test_constructor_errors_match_torch(kwargs):
    args = dict(input_size=4, hidden_size=6)
    args.update(kwargs)
    results = []
    for cls in (torch.nn.LSTM, fastlstm.LSTM):
        try:
            cls(**args)
            results.append((None, None))
        except Exception as e:  # noqa: BLE001
            results.append((type(e), str(e)))
    assert results[0] == results[1]


def test_dropout_with_one_layer_warns_like_torch():
    messages = []
    for cls in (torch.nn.LSTM, fastlstm.LSTM):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls(4, 6, num_layers=1, dropout=0.3)
        messages.append([str(w.message) for w in caught])
    assert messages[0] and messages[0] == messages[1]


# PackedSequence batch sizes that pack_padded_sequence never makes, over 5 rows of data.
BAD_BATCH_SIZES = {
    "increasing": [2, 3], "increasing later": [3, 2, 3], "zero then more": [3, 0, 2],
    "negative": [3, -1, 3], "negative first": [-1],
    "past the data": [3, 2, 1], "past the data, equal": [3, 3], "past the data, first": [6],
    "fewer rows": [3, 1], "fewer rows, equal": [2, 2], "fewer rows, one step": [1],
    "all zero": [0, 0], "trailing zero": [3, 2, 0], "2-D": [[3, 2]],
}
# oneDNN's path (float32, no projection) and torch's step-by-step one differ on some of them.
PACKED_MODULES = {"float32": dict(), "proj_size": dict(proj_size=2),
                  "float64": dict(dtype=torch.float64),
                  "bidirectional": dict(num_layers=2, bidirectional=True, proj_size=2)}


@pytest.mark.parametrize("module", list(PACKED_MODULES))
@pytest.mark.parametrize("case", list(BAD_BATCH_SIZES))
def test_malformed_batch_sizes_like_torch(case, module):
    # Where torch raises, the same exception type, with a message that names batch_sizes (torch's
    # comes from deep inside its kernel); where it runs, its results.
    kw = PACKED_MODULES[module]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 3, **kw)
    fast = fastlstm.LSTM(4, 3, **kw)
    fast.load_state_dict(ref.state_dict())
    data = torch.randn(5, 4, dtype=kw.get("dtype", torch.float32))
    packed = PackedSequence(data, torch.tensor(BAD_BATCH_SIZES[case]), None, None)
    theirs, ours = outcome_of(ref, packed), outcome_of(fast, packed)
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        assert "batch_sizes" in str(ours), ours
        return
    assert not isinstance(ours, Exception), (ours, theirs)
    (out, (h, c)), (want_out, (want_h, want_c)) = ours, theirs
    assert torch.equal(out.batch_sizes, want_out.batch_sizes)
    for got, want in ((out.data, want_out.data), (h, want_h), (c, want_c)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def outcome_of(module, packed):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "projections not supported with oneDNN"
            return module(packed)
    except Exception as e:  # noqa: BLE001 (we compare whatever each raises)
        return e

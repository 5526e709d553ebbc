"""benchmarks/bench_lstm.py's choice of rows and its correctness rule (no timing here: speed is
measured by the benchmark, never asserted by a test)."""

import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_lstm

        yield bench_lstm
    finally:
        sys.path.remove(str(BENCH))


def dtypes(items):
    return {d for _, d in items}


def test_float64_only_when_named(bench):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dtypes(bench.plan(bench.CPU_GRID, ["all"], cpu)) == {"float32", "bfloat16"}
    assert dtypes(bench.plan(bench.CPU_GRID, None, cpu)) == {"float32"}
    assert "float64" not in dtypes(bench.plan(bench.GPU_GRID, ["all"], cuda))
    assert "float64" not in dtypes(bench.plan(bench.GPU_GRID, None, cuda))
    items = bench.plan(bench.CPU_GRID, ["float64"], cpu)
    assert dtypes(items) == {"float64"} and len(items) == len(bench.CPU_GRID)


def test_float64_rule_is_tight(bench):
    cpu = torch.device("cpu")
    base = {"output": torch.randn(4, 3, dtype=torch.float64)}
    ok, rule, _ = bench.check({"output": base["output"].clone()}, base, None, torch.float64, cpu, False)
    assert ok and rule == "direct rtol=atol=1e-10"
    # A float32-sized error fails both the direct rule and the float64 fallback.
    off = {"output": base["output"] + 1e-6}
    ok, _, detail = bench.check(off, base, lambda: base, torch.float64, cpu, False)
    assert not ok and "output" in detail


def test_shape_option(bench):
    # --shape replaces the grid with the shapes given (off-grid sizes, such as H not a multiple of 64).
    args = bench.parse_args(["--shape", "100,64,200,200", "--shape", "50,16,650,650,varlen,layers=2,proj=32,bidir"])
    a, b = args.shape
    assert (a.T, a.B, a.I, a.H, a.layers, a.P, a.bidirectional, a.variable_length) == (100, 64, 200, 200, 1, 0, False, False)
    assert (b.T, b.B, b.I, b.H, b.layers, b.P, b.bidirectional, b.variable_length) == (50, 16, 650, 650, 2, 32, True, True)
    assert a.name != b.name
    assert dtypes(bench.plan(args.shape, ["all"], torch.device("cpu"))) == {"float32", "bfloat16"}
    for bad in ("1,2,3", "1,2,3,x", "1,2,3,4,foo", "0,2,3,4", "1,2,3,4,layers=0"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--shape", bad])


def test_page_faults_and_allocator_recorded(bench, monkeypatch):
    # On the CPU each row records the minor page faults per call of both implementations (the usual
    # reason torch's time on large shapes depends on the allocator's state), and every run the
    # allocator variables in force. A function that touches fresh pages shows faults, one that
    # allocates nothing shows none.
    import _common

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert _common.allocator_settings()["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert "LD_PRELOAD" not in _common.allocator_settings()

    import mmap

    def fresh_pages():
        with mmap.mmap(-1, 64 * 4096) as m:  # an anonymous mapping: every page touched faults
            for i in range(0, len(m), 4096):
                m[i] = 1

    def nothing():
        pass

    cfg = dict(warmup_calls=1, warmup_s=0.0, min_block_s=0.0, budget_s=0.0, min_reps=3, max_reps=3, reps=3)
    faults = {}
    bench.time_pair(fresh_pages, nothing, torch.device("cpu"), cfg, faults)
    assert faults["a"] >= 60 and faults["b"] < 5
    header = bench.table([], torch.device("cpu")).splitlines()[0]
    assert "torch flt" in header and "fast flt" in header

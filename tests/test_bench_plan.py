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

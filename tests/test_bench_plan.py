"""The benchmarks' choice of rows, their correctness rule, their timing loop and what they write (no
speed is asserted here: speed is measured by the benchmarks, never by a test); and the research
programs (research/gpu), which must build and pass their own checks on the CUDA emulator."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import TOL

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RECORDED = BENCH / "results" / "cpu-zen5-2026-11-29"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    """The benchmark modules: bench_lstm (its CLI), cases, check, timing, report."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_lstm
        import lstm_cases
        import lstm_check
        import report
        import timing

        yield type("Bench", (), dict(cli=bench_lstm, cases=lstm_cases, check=lstm_check, timing=timing,
                                     report=report))
    finally:
        sys.path.remove(str(BENCH))


def dtypes(items):
    return {d for _, d in items}


def test_float64_only_when_named(bench):
    plan, c = bench.cases.plan, bench.cases
    cuda = torch.device("cuda")
    assert dtypes(plan(c.CPU_GRID, ["all"], CPU)) == {"float32", "bfloat16"}
    assert dtypes(plan(c.CPU_GRID, None, CPU)) == {"float32"}
    assert "float64" not in dtypes(plan(c.GPU_GRID, ["all"], cuda))
    assert "float64" not in dtypes(plan(c.GPU_GRID, None, cuda))
    items = plan(c.CPU_GRID, ["float64"], CPU)
    assert dtypes(items) == {"float64"} and len(items) == len(c.CPU_GRID)


def test_float64_rule_is_tight(bench):
    check = bench.check.check
    base = {"output": torch.randn(4, 3, dtype=torch.float64)}
    ok, rule, _ = check({"output": base["output"].clone()}, base, None, torch.float64, CPU, False)
    tol = TOL[torch.float64]
    assert ok and rule == f"direct rtol={tol['rtol']:g} atol={tol['atol']:g}"
    # A float32-sized error fails both the direct rule and the float64 fallback.
    off = {"output": base["output"] + 1e-6}
    ok, _, detail = check(off, base, lambda: base, torch.float64, CPU, False)
    assert not ok and "output" in detail


def test_check_is_the_suites_rule(bench):
    # bench_lstm.py times a shape only if it matches by tests/helpers.py's TOL: an error just inside
    # it passes directly, one just outside it fails directly (and then the float64 fallback, where
    # torch's own error is zero here). Gradients' atol is scaled by their magnitude.
    check = bench.check.check
    tol = TOL[torch.float32]
    want = torch.zeros(5, dtype=torch.float32)
    for key, scale in (("output", 1.0), ("grad weight", 50.0)):
        b = want.clone()
        b[0] = scale  # the tensor's largest magnitude
        base = {key: b}
        inside = {key: b + torch.tensor([0, 0.5 * tol["atol"] * scale, 0, 0, 0])}
        outside = {key: b + torch.tensor([0, 2 * tol["atol"] * scale, 0, 0, 0])}
        ok, rule, _ = check(inside, base, None, torch.float32, CPU, False)
        assert ok and rule.startswith("direct"), (key, rule)
        ok, rule, detail = check(outside, base, lambda: {key: b.double()}, torch.float32, CPU, False)
        assert not ok and rule == "vs float64" and key in detail, (key, rule, detail)
    # Low precision: within 3x torch's own error (plus rounding) against float64 passes, beyond fails.
    ref = {"output": torch.ones(4, dtype=torch.float64)}
    torch_out = {"output": torch.full((4,), 1.0 + 2.0**-6, dtype=torch.bfloat16)}
    for err, expected in ((2.0**-5, True), (2.0**-3, False)):
        fast = {"output": torch.full((4,), 1.0 + err, dtype=torch.bfloat16)}
        ok, _, _ = check(fast, torch_out, lambda: ref, torch.bfloat16, CPU, False)
        assert ok is expected, err


def test_shape_option(bench):
    # --shape replaces the grid with the shapes given (off-grid sizes, such as H not a multiple of 64).
    args = bench.cli.parse_args(["--shape", "100,64,200,200", "--shape", "50,16,650,650,varlen,layers=2,proj=32,bidir"])
    a, b = args.shape
    assert (a.T, a.B, a.I, a.H, a.layers, a.P, a.bidirectional, a.variable_length) == (100, 64, 200, 200, 1, 0, False, False)
    assert (b.T, b.B, b.I, b.H, b.layers, b.P, b.bidirectional, b.variable_length) == (50, 16, 650, 650, 2, 32, True, True)
    assert a.name != b.name
    assert dtypes(bench.cases.plan(args.shape, ["all"], CPU)) == {"float32", "bfloat16"}
    for bad in ("1,2,3", "1,2,3,x", "1,2,3,4,foo", "0,2,3,4", "1,2,3,4,layers=0"):
        with pytest.raises(SystemExit):
            bench.cli.parse_args(["--shape", bad])


def test_page_faults_and_allocator_recorded(bench, monkeypatch):
    # On the CPU each row records the minor page faults per call of both implementations (the usual
    # reason torch's time on large shapes depends on the allocator's state), and every run the
    # allocator variables in force. A function that touches fresh pages shows faults, one that
    # allocates nothing shows none.
    report = bench.report
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert report.allocator_settings()["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert "LD_PRELOAD" not in report.allocator_settings()

    import mmap

    def fresh_pages():
        with mmap.mmap(-1, 64 * 4096) as m:  # an anonymous mapping: every page touched faults
            for i in range(0, len(m), 4096):
                m[i] = 1

    def nothing():
        pass

    cfg = dict(warmup_calls=1, warmup_s=0.0, min_block_s=0.0, budget_s=0.0, min_reps=3, max_reps=3, reps=3)
    t = bench.timing.budgeted({"a": fresh_pages, "b": nothing}, CPU, cfg)
    assert t["a"].faults_median >= 60 and t["b"].faults_median < 5
    header = bench.cli.table([], CPU).splitlines()[0]
    assert "torch flt" in header and "fast flt" in header


def test_interleaved_blocks(bench):
    # One block of each function per round, the order reversed every other round, `calls` calls a
    # block; the deadline stops a run only after min_rounds.
    timing = bench.timing
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    t = timing.interleaved(fns, 4, {"a": 2, "b": 1, "c": 1})
    assert "".join(log) == "aabc" + "cbaa" + "aabc" + "cbaa"
    assert [len(s.seconds) for s in t.values()] == [4, 4, 4] and t["a"].calls == 2
    assert all(len(s.faults) == 4 for s in t.values())  # CPU: page faults of every block
    log.clear()
    t = timing.interleaved(fns, 10, 1, deadline=0.0, min_rounds=3)
    assert "".join(log) == "abc" + "cba" + "abc"
    # bench_lstm's policy: rounds fit the budget within [min_reps, max_reps]; `reps` fixes them.
    cfg = dict(warmup_calls=2, warmup_s=0.0, min_block_s=0.0, budget_s=0.0, min_reps=5, max_reps=9, reps=None)
    t = timing.budgeted({"a": lambda: None, "b": lambda: None}, CPU, cfg)
    assert len(t["a"].seconds) == len(t["b"].seconds) == 5
    t = timing.budgeted({"a": lambda: None}, CPU, dict(cfg, reps=7))
    assert len(t["a"].seconds) == 7
    assert timing.iqr_pct([1.0, 1.0, 1.0]) is None and timing.iqr_pct([1.0, 2.0, 3.0, 4.0, 5.0]) == 100 * 3 / 3
    assert timing.geomean([2.0, 8.0, None]) == pytest.approx(4.0)


def test_format_table(bench):
    text = bench.report.format_table(["name", "ms"], [["a", 1.5], ["long name", 10]], left={0})
    assert text.splitlines() == ["name        ms", "---------  ---", "a          1.5", "long name   10"]


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _keys_kept(new, old, what):
    # Whatever reads the recorded results must read a new run's: every key of theirs is still there.
    missing = sorted(set(old) - set(new))
    assert not missing, f"{what}: keys of the recorded results missing from a new run: {missing}"


def test_bench_lstm_writes_what_was_recorded(tmp_path):
    out = _run([str(BENCH / "bench_lstm.py"), "--device", "cpu", "--shape", "6,3,5,4,varlen", "--reps", "4",
                "--out", str(tmp_path / "r")], tmp_path)
    table = out[out.index("name "):].splitlines()
    assert table[0].split() == ["name", "T", "B", "I", "H", "layers", "bidir", "varlen", "dtype", "mode", "torch",
                                "ms", "fastlstm", "ms", "speedup", "iqr%", "fast", "GFLOP/s", "torch", "flt",
                                "fast", "flt"]
    assert [line.split()[9] for line in table[2:4]] == ["inference", "training"]
    assert "CPU flags: avx2=" in out and "allocator: " in out
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    old = json.loads((RECORDED / "results.json").read_text())
    _keys_kept(doc, old, "results.json")
    _keys_kept(doc["rows"][0], old["rows"][0], "results.json rows")
    assert [r["status"] for r in doc["rows"]] == ["ok", "ok"] and all(r["reps"] == 4 for r in doc["rows"])
    csv_header = (tmp_path / "r" / "results.csv").read_text().splitlines()[0]
    assert csv_header == (RECORDED / "results.csv").read_text().splitlines()[0]
    assert (tmp_path / "r" / "speedup.png").stat().st_size > 0


def test_bench_cell_and_memory_write_what_was_recorded(tmp_path):
    out = _run([str(BENCH / "bench_cell.py"), "--batches", "2", "--hidden", "8", "--steps", "2", "--rounds", "3",
                "--json", str(tmp_path / "cell.json")], tmp_path)
    lines = out.splitlines()
    assert lines[1].split() == ["mode", "B", "H", "torch", "us/step", "fastlstm", "us/step", "ratio", "(min-max)",
                                "min/min"]
    assert [line.split()[0] for line in lines[2:4]] == ["inference", "train"]
    doc = json.loads((tmp_path / "cell.json").read_text())
    old = json.loads((RECORDED / "bench_cell.json").read_text())
    _keys_kept(doc, old, "bench_cell.json")
    _keys_kept(doc["rows"][0], old["rows"][0], "bench_cell.json rows")
    assert "cpu_flags" in doc and "torch_cpu_capability" in doc

    _run([str(BENCH / "memory_cpu.py"), "--T", "4", "--B", "2", "--I", "8", "--H", "8", "--threads", "1",
          "--out", str(tmp_path)], tmp_path)
    doc = json.loads((tmp_path / "memory_cpu.json").read_text())
    old = json.loads((RECORDED / "memory_cpu.json").read_text())
    _keys_kept(doc, old, "memory_cpu.json")
    _keys_kept(doc["rows"][0], old["rows"][0], "memory_cpu.json rows")


# ---- The research programs (research/gpu) on the CUDA emulator of tests/emu ----
# They check their kernels' results themselves; here: that they build and pass on the emulator, and
# that their checks fail once a barrier they depend on is gone (blocks drift apart under
# research/gpu/emulate.sh, so a missing grid-wide barrier lets a block read a stale h).

EMULATE = ROOT / "research" / "gpu" / "emulate.sh"
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="no C++ compiler (g++ or $CXX) for the emulator")
LF_ARGS = ["--check", "--threads", "32", "--smem-kb", "0", "--steps", "16"]
# A small emulated GPU: the prototype's small-grid and chunked-K paths, several tiles per warp.
PP_ENV = {"FASTLSTM_EMU_SMS": "8", "FASTLSTM_EMU_SMEM_KB": "40"}
PP_ARGS = ["--emu", "--steps", "3"]


def _emulate(program, args, env):
    proc = subprocess.run(["bash", str(EMULATE), str(program), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a check failed; else a crash
    return proc.returncode, proc.stdout


def _mutant(tmp_path, name, old, new=""):
    src = (ROOT / "research" / "gpu" / f"{name}.cu").read_text()
    assert src.count(old) == 1, old
    path = tmp_path / f"{name}.cu"
    path.write_text(src.replace(old, new))
    return path


def _latency_rows(out):
    # variant -> error counts of its timed rows
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 8 and not line.startswith(("#", "variant")) and cells[7].isdigit():
            rows.setdefault(cells[0], []).append(int(cells[7]))
    return rows


def _prototype_checks(out):
    # the `check` column of every configuration that ran
    return [line.split()[11] for line in out.splitlines() if line.startswith(("fp32-", "bf16-"))
            and "SKIPPED" not in line]


@needs_cxx
def test_latency_floor_on_the_emulator():
    rc, out = _emulate("latency_floor", LF_ARGS, {"FASTLSTM_EMU_SMS": "16"})
    rows = _latency_rows(out)
    assert rc == 0 and "# OK" in out, out
    assert {"launch+h", "graph+h", "coop+h", "flag+h", "cluster-2+h", "cluster-8+h"} <= set(rows), out
    assert all(e == 0 for v, errs in rows.items() if "control" not in v for e in errs), out
    # The negative control (no barrier at all) sees stale values: the check can see a missing one.
    assert rows["nobarrier+h(control)"][0] > 0, out


@needs_cxx
def test_persistent_prototype_on_the_emulator():
    rc, out = _emulate("persistent_prototype", PP_ARGS, PP_ENV)
    checks = _prototype_checks(out)
    assert rc == 0 and "# OK" in out and len(checks) >= 20 and set(checks) == {"ok"}, out


@needs_cxx
@pytest.mark.slow
def test_emulated_checks_catch_a_missing_barrier(tmp_path):
    # The flag barrier's wait removed: every flag row of the latency floor sees stale values (the
    # others none), and every configuration of the prototype misses its error bound.
    wait = "    while (load_acquire(counter) < target) {\n    }\n"
    rc, out = _emulate(_mutant(tmp_path, "latency_floor", wait), LF_ARGS, {"FASTLSTM_EMU_SMS": "16"})
    rows = _latency_rows(out)
    assert rc == 1 and all(e > 0 for v, errs in rows.items() if v.startswith("flag") for e in errs), out
    assert all(e == 0 for v, errs in rows.items() if v.startswith(("coop", "cluster")) for e in errs), out
    # The cluster barrier removed: every cluster row.
    sync = "    cluster.sync();\n    if constexpr (kExchange) {\n      // Rank by rank"
    rc, out = _emulate(_mutant(tmp_path, "latency_floor", sync, sync.replace("    cluster.sync();\n", "")),
                       LF_ARGS, {"FASTLSTM_EMU_SMS": "16"})
    rows = _latency_rows(out)
    assert rc == 1 and all(e > 0 for v, errs in rows.items() if v.startswith("cluster") for e in errs), out
    assert all(e == 0 for v, errs in rows.items() if v.startswith("flag") for e in errs), out
    wait = "      while (load_acquire(p.counter) < target) {\n      }\n"
    rc, out = _emulate(_mutant(tmp_path, "persistent_prototype", wait), PP_ARGS, PP_ENV)
    checks = _prototype_checks(out)
    assert rc == 1 and len(checks) >= 20 and set(checks) == {"FAIL"}, out

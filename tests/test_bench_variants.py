"""benchmarks/bench_variants.py (issue 29's variants against the loops users run, and against plain
fastlstm): what it runs, that it checks every baseline before timing it, and what it writes. No
speed is asserted here: speed is measured by the benchmark, never by a test."""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "bench_variants.py"
QUICK = ["--quick", "--threads", "1", "--reps", "2"]


@pytest.fixture(scope="module")
def bv():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_variants

        yield bench_variants
    finally:
        sys.path.remove(str(BENCH))


def expected_rows(bv):
    """(variant, mode, baseline) of every row, in the order the CLI writes them."""
    return [(name, mode, b) for name in bv.VARIANTS for mode in bv.MODES for b in bv.variant(name).baselines()]


def test_quick_run_writes_the_table_json_csv_and_markdown(bv, tmp_path):
    out_dir = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *QUICK, "--out", str(out_dir)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # The host, the fastlstm kernels, the allocator, the revision and the command come first.
    assert "CPU flags: avx2=" in out and "fastlstm CPU kernels" in out and "allocator: " in out
    assert "command: " in out and "--quick" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("shape "))
    assert lines[start].split() == ["shape", "variant", "mode", "baseline", "baseline", "ms", "fastlstm", "ms",
                                    "speedup", "plain", "ms", "cost", "iqr%"]
    table = lines[start + 2:start + 2 + len(expected_rows(bv))]
    assert [tuple(line.split()[1:4]) for line in table] == expected_rows(bv)
    assert "geometric mean speedup over loops, training" in out and "geometric mean variant cost, inference" in out
    assert "targets: speedup >= 3x" in out

    doc = json.loads((out_dir / "results.json").read_text())
    for key in ("cpu", "cpu_flags", "torch_cpu_capability", "fastlstm_cpu_isa", "fastlstm_variant_backend", "fastlstm_path", "torch",
                "threads", "allocator", "git", "command", "date", "api", "shapes", "variants", "targets",
                "geomeans", "targets_met", "load_average_before", "load_average_after"):
        assert key in doc, key
    assert doc["threads"] == 1 and doc["api"] == "ops" and doc["shapes"] == [list(bv.QUICK_SHAPES[0])]
    rows = doc["rows"]
    assert [(r["variant"], r["mode"], r["baseline"]) for r in rows] == expected_rows(bv)
    for r in rows:
        assert r["status"] == "ok" and r["match"], r
        assert r["reps"] == 2
        for key in ("baseline_ms", "fastlstm_ms", "plain_ms", "speedup", "variant_cost"):
            assert r[key] > 0, (key, r)
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["fastlstm_ms"])
        assert r["variant_cost"] == pytest.approx(r["fastlstm_ms"] / r["plain_ms"])
        assert (r["speed_target_met"] is None) == (not r["target_applies"])
    # torch.nn.LSTM with a dropped w_hh is a fused reference point, not a loop of the target.
    assert {r["baseline"] for r in rows if not r["target_applies"]} == {"torch.nn.LSTM"}

    with open(out_dir / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == bv.CSV_FIELDS and len(csv_rows) == len(rows)
    md = (out_dir / "results.md").read_text().splitlines()
    header = "| " + " | ".join(bv.HEADER) + " |"
    assert header in md
    body = md[md.index(header) + 2:md.index(header) + 2 + len(rows)]
    assert [tuple(c.strip() for c in line.split("|")[2:5]) for line in body] == expected_rows(bv)
    assert any(line.startswith("- git ") and "command: " in line for line in md)


def unclipped_case(bv, case):
    wrong = object.__new__(bv.Case)
    wrong.__dict__.update(case.__dict__)
    wrong.v = dataclasses.replace(case.v, cell_clip=None)
    return wrong


def test_a_baseline_that_differs_is_not_timed(bv, monkeypatch, one_thread):
    # A "loop" that forgets the cell clip computes something else: reported as MISMATCH, not timed;
    # the group's other baseline (cell-LayerNorm) is still checked and timed.
    monkeypatch.setitem(bv.BASELINE_BUILDERS, "loop", lambda case: bv.loop(unclipped_case(bv, case)))
    v = bv.Variant("all", zoneout=0.1, weight_drop=0.3, layer_norm=True, cell_clip=0.05)
    cfg = dict(warmup_calls=1, warmup_s=0.0, min_block_s=0.0, budget_s=0.0, min_reps=1, max_reps=1, reps=1)
    rows = bv.measure(bv.report.load_impl(), (5, 2, 6, 4), v, "training", "ops", cfg)
    by = {r["baseline"]: r for r in rows}
    assert by["loop"]["status"] == "mismatch" and not by["loop"]["match"] and "baseline_ms" not in by["loop"]
    assert by["cell-LayerNorm"]["status"] == "ok" and by["cell-LayerNorm"]["match"]
    # fastlstm itself wrong (the clip left out): every baseline differs from it, nothing is timed.
    monkeypatch.undo()
    fused = bv.fused_ops
    monkeypatch.setattr(bv, "fused_ops", lambda case: fused(unclipped_case(bv, case)))
    rows = bv.measure(bv.report.load_impl(), (5, 2, 6, 4), v, "training", "ops", cfg)
    assert [r["status"] for r in rows] == ["mismatch", "mismatch"]


def test_masks_are_drawn_per_call_in_the_modules_order(bv):
    # Training: weight drop's mask (F.dropout's draw), then zoneout's c and h masks, fresh each call;
    # evaluation: no weight drop and zoneout's expectation.
    case = bv.Case(7, 3, 4, 5, bv.variant("all"), training=True)
    torch.manual_seed(3)
    a = bv.draw_masks(case)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(case.weights["w_hh"].detach(), 0.3)
    zc = torch.empty(7, 3, 5).bernoulli_(0.1)
    assert torch.equal(a.dropped(case.weights["w_hh"].detach()), dropped)
    assert torch.equal(a.zoneout_c, zc) and a.zoneout_h.shape == (7, 3, 5)
    assert not torch.equal(bv.draw_masks(case).zoneout_c, a.zoneout_c)
    m = bv.draw_masks(bv.Case(7, 3, 4, 5, bv.variant("all"), training=False))
    assert m.drop is None and m.zoneout_c == m.zoneout_h == 0.1


def test_module_api_when_there_is_one(bv, one_thread):
    impl = bv.report.load_impl()
    if not bv.has_module_api(impl):
        pytest.skip("this fastlstm.LSTM has no variant options yet")
    # The module draws its own masks: with the same seed they must be the ones drawn here.
    cfg = dict(warmup_calls=1, warmup_s=0.0, min_block_s=0.0, budget_s=0.0, min_reps=1, max_reps=1, reps=1)
    for mode in bv.MODES:
        rows = bv.measure(impl, (5, 2, 6, 4), bv.variant("all"), mode, "module", cfg)
        assert all(r["status"] == "ok" for r in rows), rows


def test_options(bv):
    args = bv.parse_args(["--shapes", "100,64,512,512", "20,2,8,8", "--variants", "layer_norm", "all"])
    assert args.shapes == [(100, 64, 512, 512), (20, 2, 8, 8)] and args.variants == ["layer_norm", "all"]
    assert bv.parse_args([]).api == "ops"
    for bad in ("1,2,3", "1,2,3,x", "0,2,3,4", "1,2,3,4,5"):
        with pytest.raises(SystemExit):
            bv.parse_args(["--shapes", bad])
    env = {"cpu": "AMD EPYC (family 26, model 2: Zen 5)", "fastlstm_cpu_isa": "avx2"}
    assert bv.host_slug(env) == "zen5-avx2"
    assert bv.host_slug({"cpu": "Intel(R) Xeon(R) Platinum 8480+", "fastlstm_cpu_isa": "avx512"}) == (
        "intel-xeon-platinum-8480-avx512")
    assert bv.host_slug({"cpu": "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz (family 6, model 158)",
                         "fastlstm_cpu_isa": "avx2"}) == "intel-core-i7-8700-avx2"

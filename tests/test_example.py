"""Smoke test of examples/char_lm.py: a few training steps of both implementations, in a subprocess
as a user would run it."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"


def test_char_lm_runs_and_plots(tmp_path):
    plot, summary = tmp_path / "char_lm.png", tmp_path / "summary.json"
    cmd = [
        sys.executable, str(EXAMPLE), "--impl", "both", "--epochs", "1", "--max-steps", "5",
        "--hidden", "16", "--layers", "2", "--seq-len", "16", "--batch", "4", "--sample-len", "20",
        "--plot", str(plot), "--summary", str(summary),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--- sample (fastlstm) ---" in proc.stdout and "--- sample (torch) ---" in proc.stdout

    results = json.loads(summary.read_text())["results"]
    torch_run, fast_run = results["torch"], results["fastlstm"]
    for run in (torch_run, fast_run):
        assert len(run["losses"]) == 5 and len(run["epoch_times"]) == 1
        assert all(math.isfinite(v) for v in run["losses"] + run["val_losses"])
    # Same seed, initial weights and batches: the two implementations start from the same loss.
    assert math.isclose(torch_run["losses"][0], fast_run["losses"][0], rel_tol=1e-5)

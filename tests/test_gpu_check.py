"""bench/gpu_check.py must work the first time a GPU is at hand: its CPU quick mode runs every
stage on tiny shapes, so the script cannot rot while no GPU is lent to the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bounded import run

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_covers_every_stage(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = run([sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--quick",
                "--threads", "2", "--results", str(results)], env=env, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("\n## GPU check: ")
    for stage in ("train", "fp16", "sample", "memory"):
        assert f"(stage {stage}:" in text and f"Stage {stage} failed" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ours |")]
    assert [r.split("|")[2].strip() for r in rows] == ["False", "True"]  # eager and compiled
    assert "all finite: True" in text
    assert text.count("| tiny |") == 2  # quick: the plainest and the fullest memory options

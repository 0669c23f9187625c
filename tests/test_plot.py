"""gpt2 plot: a PNG from metrics.jsonl, and clean one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from gpt2.cli import run
from gpt2.errors import UserError
from gpt2.commands.plot import main, plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 200, tokens_per_step: int = 2048,
              val_every: int = 25) -> Path:
    run_dir.mkdir(parents=True)
    avg_a = avg_b = 0.0
    lines = []
    for step in range(1, steps + 1):
        loss = 3 + 7 * math.exp(-step / 40) + 0.3 * math.sin(step * 1.7)
        avg_a, avg_b = 0.99 * avg_a + loss, 0.99 * avg_b + 1
        record = {"step": step, "loss": loss, "avg": avg_a / avg_b, "lr": 1e-4,
                  "tokens_per_sec": 5000.0, "elapsed": step * 0.4,
                  "tokens": step * tokens_per_step}
        if step == 1 or step % val_every == 0:
            record["val_loss"] = 3.2 + 7 * math.exp(-step / 45)
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = write_run(tmp_path / "checkpoint" / "run1")
    assert main([str(run_dir)]) == 0
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out
    # Several runs overlaid, to a chosen file; a metrics.jsonl path works as well as its folder.
    other = write_run(tmp_path / "checkpoint" / "run2", steps=120, val_every=40)
    out = tmp_path / "compare.png"
    assert main([str(run_dir), str(other / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_missing_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "run1").mkdir()
    assert run(main, [str(tmp_path / "run1")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl" in err and err.count("\n") == 1
    assert run(main, [str(tmp_path / "nothing-here")]) == 1
    assert "not found" in capsys.readouterr().err


def test_matplotlib_missing_tells_how_to_install(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run1", steps=5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_runs([run_dir], tmp_path / "x.png")


def test_read_metrics_skips_a_cut_last_line_but_not_a_bad_middle_one(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run1", steps=10)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 11, "lo')
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 11))
    assert "incomplete last line" in capsys.readouterr().err
    lines = metrics.read_text().splitlines()
    lines[3] = "not json"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:4"):
        read_metrics(run_dir)

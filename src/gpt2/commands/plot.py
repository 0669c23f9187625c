"""Plot a training run's loss curves from its metrics.jsonl into a PNG.

    gpt2 plot checkpoint/run1                        # -> checkpoint/run1/loss.png
    gpt2 plot checkpoint/run1 checkpoint/run2 --out compare.png

metrics.jsonl (written by ``gpt2 train``) holds one JSON object per step: ``step``, ``loss``,
``avg`` (the moving average the log line prints), ``lr``, ``tokens_per_sec``, ``elapsed``,
``tokens`` (seen so far) and, on steps where validation ran, ``val_loss``; on steps where
``--eval_every`` scored benchmarks, ``hellaswag_acc``, ``hellaswag_acc_norm``, ``lambada_acc``
and ``lambada_perplexity``. The plot shows the raw training loss (faint), its moving average,
and validation loss against tokens seen (steps when ``tokens`` is missing); benchmark
accuracies, when there are any, in a second panel beside it (as build-nanogpt's log plot).
matplotlib is optional (``pip install matplotlib``) and drawn with the Agg backend, so no
display is needed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..flags import ArgumentParser
from ..errors import UserError
from ..files.atomic import atomic_write

METRICS = "metrics.jsonl"  # gpt2.training.run_dir.METRICS_FILE


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (or a run directory holding one).

    A last line cut short by a crash mid-write is skipped with a warning; any other bad line is
    an error naming the file and line.
    """
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        where = f"{path} has no {METRICS}" if path.is_dir() else f"{file}: file not found"
        raise UserError(f"{where}; is this a run directory written by gpt2 train?") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(numbered) - 1 and n > 0:
                print(f"warning: {file}:{i}: skipping an incomplete last line", file=sys.stderr)
                break
            raise UserError(f"{file}:{i}: invalid metrics record ({e})") from None
        records.append(record)
    if not any("loss" in r for r in records):
        raise UserError(f"{file}: no training loss recorded yet")
    return records


def _series(records: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x_key], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Draw the loss curves of one or more runs into the PNG ``out``; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'gpt2[plot]' (or pip install "
                        "matplotlib)") from None
    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    data = [(Path(run), read_metrics(run)) for run in runs]
    # Tokens seen is comparable across batch sizes and context lengths; steps are the fallback.
    x_key = "tokens" if all(any("tokens" in r for r in recs) for _, recs in data) else "step"
    accuracies = sorted({k for _, recs in data for r in recs for k in r
                         if k.endswith(("_acc", "_acc_norm", "rewards/accuracies"))})
    if accuracies:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(15, 5.5), dpi=110)
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, records) in enumerate(data):
        color = colors[i % len(colors)]
        name = run.name if run.is_dir() else run.parent.name
        label = f"{name}: " if len(data) > 1 else ""
        x, y = _series(records, "loss", x_key)
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8, label=f"{label}train loss")
        x, y = _series(records, "avg", x_key)
        if x:
            ax.plot(x, y, color=color, linewidth=2, label=f"{label}train loss (moving average)")
        x, y = _series(records, "val_loss", x_key)
        if x:
            ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.5,
                    label=f"{label}validation loss")
        for j, key in enumerate(accuracies):
            x, y = _series(records, key, x_key)
            if x:
                right.plot(x, y, color=color, marker="os^v"[j % 4], markersize=4,
                           linestyle=("-", "--", ":", "-.")[j % 4], label=f"{label}{key}")
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.set_ylabel("loss (nats per token)")
    title = data[0][0].name if len(data) == 1 and data[0][0].is_dir() else "training runs"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if accuracies:
        right.set_xlabel(ax.get_xlabel())
        right.set_ylabel("accuracy")
        right.set_title("benchmarks (--eval_tasks), preference accuracy")
        right.grid(True, alpha=0.3)
        right.legend()
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="gpt2 plot", description="Plot training loss (raw and moving average) and "
                                      "validation loss against tokens seen, from metrics.jsonl.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory (checkpoint/<run>) or metrics.jsonl; several are overlaid")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: loss.png in the first run's directory)")
    args = p.parse_args(argv)
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "loss.png"
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0

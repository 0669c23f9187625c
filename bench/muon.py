"""Muon against AdamW from scratch: the quickstart's model, corpus and recipe, several seeds.

Both train the quickstart's GPT-2 (4 x 128, n_ctx 128, its 2048-token BPE on Python's pydoc
text) for ``--steps`` updates with its schedule (cosine, 30 warm-up steps, clipping 1.0,
dropout 0.1, weight decay 0.1), validating every ``--val_every`` steps on the same held-out
batches. AdamW is the quickstart's own (lr 2e-3); Muon (``--optimizer muon``) takes
``--muon_lr`` for the blocks' matrices and the same AdamW rate for the rest. Printed:
validation loss against steps for each, and how many steps Muon needs to reach AdamW's final
validation loss (linear interpolation between validations), per seed and as a ratio.

    python bench/muon.py                                  # 3 seeds x 400 steps, ~12 min on 2 CPUs
    python bench/muon.py --seeds 1,2 --steps 200 --muon_lr 0.02
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import load_note, machine, setup

from gpt2.commands.quickstart import build_model_dir, write_corpus
from gpt2.commands.train import main as train_main
from gpt2.training.optim import MUON_LR


def run(root: Path, corpus: Path, model_dir: Path, seed: int, steps: int, val_every: int,
        optimizer: list[str]) -> list[tuple[int, float]]:
    name = f"{optimizer[1]}-{seed}"
    argv = ["--dataset", str(corpus), "--model_dir", str(model_dir), "--init", "fresh",
            "--restore_from", "fresh", "--overwrite", "--run_name", name,
            "--checkpoint_dir", str(root / "checkpoint"), "--samples_dir", str(root / "s"),
            "--max_steps", str(steps), "--batch_size", "16", "--learning_rate", "2e-3",
            "--weight_decay", "0.1", "--lr_schedule", "cosine", "--warmup_steps", "30",
            "--grad_clip", "1.0", "--dropout", "0.1", "--val_every", str(val_every),
            "--val_batch_size", "8", "--val_batch_count", "8", "--sample_every", "0",
            "--save_every", "0", "--print_every", str(steps), "--seed", str(seed), *optimizer]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(argv) == 0
    lines = (root / "checkpoint" / name / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["val_loss"]) for m in map(json.loads, lines) if "val_loss" in m]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation loss reaches ``target`` (interpolated)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--val_every", type=int, default=40)
    p.add_argument("--muon_lr", type=float, default=MUON_LR, help="default: train.py's")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    device = setup("cpu", args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-muon-"))
    splits = write_corpus(root / "corpus")
    build_model_dir(splits["train"], root / "model", 2048)
    curves = {}
    for seed in seeds:
        for name, flags in (("adamw", ["--optimizer", "adamw"]),
                            ("muon", ["--optimizer", "muon", "--muon_lr", str(args.muon_lr)])):
            curves[name, seed] = run(root, root / "corpus", root / "model", seed, args.steps,
                                     args.val_every, flags)
            print(f"  {name} seed {seed}: final validation loss {curves[name, seed][-1][1]:.4f}",
                  file=sys.stderr, flush=True)

    print(f"# {machine(device, args.threads)}")
    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# command: python bench/muon.py {args_text}")
    print(f"# quickstart model and corpus from scratch, {args.steps} steps, seeds {seeds}; "
          f"AdamW lr 2e-3; Muon lr {args.muon_lr} (+ AdamW 2e-3 for the rest)")
    steps = [s for s, _ in curves["adamw", seeds[0]]]
    print("| step | " + " | ".join(f"AdamW s{s} | Muon s{s}" for s in seeds) + " |")
    print("|---|" + "---|---|" * len(seeds))
    for i, step in enumerate(steps):
        row = [f"{curves[k, s][i][1]:.3f}" for s in seeds for k in ("adamw", "muon")]
        print(f"| {step} | " + " | ".join(row) + " |")
    ratios = []
    print("\n| seed | AdamW final | Muon final | Muon steps to AdamW's final | ratio |")
    print("|---|---|---|---|---|")
    for s in seeds:
        target = curves["adamw", s][-1][1]
        reach = steps_to_reach(curves["muon", s], target)
        ratio = None if reach is None else reach / args.steps
        ratios.append(ratio)
        print(f"| {s} | {target:.4f} | {curves['muon', s][-1][1]:.4f} | "
              f"{'not reached' if reach is None else f'{reach:.0f}'} | "
              f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    reached = [r for r in ratios if r is not None]
    if reached:
        print(f"\nMuon reaches AdamW's final validation loss in {np.mean(reached):.2f}x the steps "
              f"(mean of {len(reached)} of {len(seeds)} seeds)")
    else:
        print("\nMuon did not reach AdamW's final validation loss in any seed")
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

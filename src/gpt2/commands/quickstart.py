"""``gpt2 quickstart`` (``./quickstart.sh``): the whole pipeline in minutes on a CPU, no download.

1. corpus: the Python documentation topics shipped with Python itself (``pydoc_data.topics``,
   ~465 KB of English prose and code) written as one document per topic into
   ``<out>/corpus/{train,valid,test}/``;
2. tokenizer: a byte-level BPE (GPT-2's format, ~2k tokens) trained on the training split;
3. model: a small GPT-2 (4 layers, 128 wide, 128-token context) trained from scratch with
   ``gpt2 train --init fresh``, validation loss printed as it falls;
4. a sample from the checkpoint, which is itself a model directory, and the commands to
   fine-tune the real 124M model on your own text.

    python -m gpt2 quickstart                     # everything under ./quickstart/
    python -m gpt2 quickstart --max_steps 100     # quicker, worse
    python -m gpt2 quickstart --chat              # instruction tuning instead (quickstart_chat)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..flags import ArgumentParser
from ..errors import UserError
from ..files.atomic import write_text

MODEL = {"n_ctx": 128, "n_embd": 128, "n_head": 4, "n_layer": 4}


def write_corpus(out: Path) -> dict[str, list[Path]]:
    """One file per pydoc topic; every 10th topic (in name order) to valid, the next to test."""
    from pydoc_data.topics import topics

    splits: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    shutil.rmtree(out, ignore_errors=True)
    for i, name in enumerate(sorted(topics)):
        split = "valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train"
        path = out / split / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, topics[name].strip() + "\n", durable=False)
        splits[split].append(path)
    return splits


def build_model_dir(train_files: list[Path], out: Path, vocab_size: int) -> int:
    """Tokenizer files + hparams.json of the small model; returns the vocabulary size."""
    from ..tokenizer.train import train_tokenizer

    train_tokenizer([str(p) for p in train_files], vocab_size, out, quiet=True, **MODEL)
    return json.loads((out / "hparams.json").read_text())["n_vocab"]


def _val_losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2 quickstart",
                       description="The whole pipeline on a CPU in minutes: a corpus shipped "
                       "with Python, a tokenizer, a small GPT-2, a sample.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None,
                   help="folder for the corpus, model and run (default: quickstart, or "
                        "quickstart-chat with --chat)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="training steps (default: 400, or 2000 with --chat)")
    p.add_argument("--batch_size", type=int, default=16, help="windows of 128 tokens per step")
    p.add_argument("--vocab_size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--seed", type=int, default=1234, help="seed of the whole run")
    p.add_argument("--chat", action="store_true",
                   help="instruction tuning instead: a synthetic chat task, trained on the "
                        "answers only, exact-match accuracy on held-out prompts (default "
                        "--out quickstart-chat, --max_steps 2000)")
    p.add_argument("--compare", action="store_true",
                   help="with --chat: also train with --train_on_prompt for the same steps")
    p.add_argument("--examples", type=int, default=20000,
                   help="with --chat: training chats of the synthetic task")
    p.add_argument("--align", action="store_true",
                   help="preference and reward tuning after SFT on the chat task: DPO, GRPO "
                        "and continued SFT from one short SFT run, exact match of each "
                        "(default --out quickstart-align, --max_steps 800 of SFT)")
    p.add_argument("--align_steps", type=int, default=200,
                   help="with --align: steps of each run after SFT")
    return p


def _align(args) -> int:
    from .quickstart_align import align_main

    if args.chat or args.compare:
        raise UserError("--align runs its own chat task; leave out --chat and --compare")
    if args.align_steps < 1:
        raise UserError(f"--align_steps must be >= 1, got {args.align_steps}")
    return align_main(Path(args.out), args.max_steps, args.align_steps, args.seed,
                      args.examples)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out or ("quickstart-align" if args.align else
                            "quickstart-chat" if args.chat else "quickstart")
    args.max_steps = args.max_steps or (800 if args.align else 2000 if args.chat else 400)
    if args.max_steps < 1:
        raise UserError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.align:
        return _align(args)
    if args.chat:
        from .quickstart_chat import chat_main

        if args.examples < 1:
            raise UserError(f"--examples must be >= 1, got {args.examples}")
        return chat_main(Path(args.out), args.max_steps, args.seed, args.compare, args.examples)
    if args.compare or args.examples != 20000:
        raise UserError("--compare and --examples go with --chat")

    from .train import main as train_main

    t0 = time.time()
    out = Path(args.out)
    corpus, model_dir = out / "corpus", out / "model"
    print(f"[1/4] Writing the corpus (Python's pydoc topics) to {corpus}/")
    splits = write_corpus(corpus)
    print(f"      {', '.join(f'{k}: {len(v)} documents' for k, v in splits.items())}")

    print(f"[2/4] Training a {args.vocab_size}-token byte-level BPE tokenizer -> {model_dir}/")
    n_vocab = build_model_dir(splits["train"], model_dir, args.vocab_size)
    print(f"      vocabulary: {n_vocab} tokens; model: {json.dumps(MODEL)}")

    print(f"[3/4] Training a small GPT-2 from scratch ({args.max_steps} steps)")
    run_name = "quickstart"
    code = train_main([
        "--dataset", str(corpus), "--model_dir", str(model_dir), "--init", "fresh",
        "--restore_from", "fresh", "--overwrite", "--run_name", run_name,
        "--checkpoint_dir", str(out / "checkpoint"), "--samples_dir", str(out / "samples"),
        "--max_steps", str(args.max_steps), "--batch_size", str(args.batch_size),
        "--optimizer", "adamw", "--learning_rate", "2e-3", "--weight_decay", "0.1",
        "--lr_schedule", "cosine", "--warmup_steps", "30", "--grad_clip", "1.0",
        "--dropout", "0.1", "--val_every", str(max(1, args.max_steps // 5)),
        "--val_batch_size", "8", "--val_batch_count", "8", "--sample_every", "0",
        "--save_every", "0", "--print_every", "25", "--seed", str(args.seed),
    ])
    if code:
        return code
    run_dir = out / "checkpoint" / run_name

    print(f"[4/4] Sampling from {run_dir} (a model directory: gpt2.load_model reads it)")
    import torch

    from ..io.inference import load_for_inference
    from ..sampling import sample_sequence

    model, enc, _, _ = load_for_inference(run_dir, "cpu")
    context = torch.tensor([[enc.eot_token]])
    tokens = sample_sequence(model, 120, context, temperature=0.8, top_k=40, seed=args.seed)
    print("=" * 40 + " SAMPLE " + "=" * 40)
    print(enc.decode(tokens[0, 1:].tolist()))
    print("=" * 88)

    val = _val_losses(run_dir / "metrics.jsonl")
    if len(val) >= 2:
        print("validation loss: " + " -> ".join(f"{v:.2f} (step {s})" for s, v in val))
    print(f"Done in {time.time() - t0:.0f} s.\n")
    print(f"""Next steps
  Sample more:     python src/generate_unconditional_samples.py --model_dir {run_dir} --top_k 40
  Fine-tune 124M on your own text (my.txt):
    python download_model.py 124M
    PYTHONPATH=src ./train.py --dataset my.txt --model_name 124M --run_name mine \\
        --val_fraction 0.05 --val_every 100 --sample_every 100 --save_every 500
    (Ctrl-C saves and stops; run the same command again to resume where it stopped.)
    python src/interactive_conditional_samples.py --model_dir checkpoint/mine --top_k 40""")
    return 0


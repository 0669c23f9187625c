"""Speculative decoding at batch 1, greedy: tokens/s with prompt lookup (and a draft model)
against plain decoding of the same model, in one run, with identical output checked.

Input-grounded: the prompt is a passage of held-out text followed by its first words again,
so the continuation can quote it (as code edits and summaries quote their input). Open-ended:
the prompt is the passage's first 16 tokens. Both with the model given (default: the
quickstart's, ``python -m gpt2 quickstart``), and open-ended also on random 124M-shape weights
(speed only: does checking guesses that fail slow ordinary decoding down?).

    python bench/speculative.py --model quickstart/checkpoint/run1 --corpus quickstart/corpus/test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import SHAPES, load_note, machine, setup

from gpt2.io.inference import load_for_inference
from gpt2.model import GPT
from gpt2.sampling import decode
from gpt2.speculative import DraftModel, PromptLookup


def timed(model, prompts, new, speculator=None, rounds=3):
    """(tokens/s: median over rounds of all prompts' new tokens over their time, outputs)."""
    rates, outs = [], None
    for _ in range(rounds):
        t, count, outs = time.perf_counter(), 0, []
        for p in prompts:
            out = decode(model, torch.tensor([p]), new(p), temperature=0,
                         speculator=speculator)[0]
            outs.append(out)
            count += len(out)
        rates.append(count / (time.perf_counter() - t))
    return float(np.median(rates)), outs


def compare(name, model, prompts, new, speculators, rounds):
    base, want = timed(model, prompts, new, rounds=rounds)
    for label, spec in speculators.items():
        spec.guessed = spec.kept = 0
        rate, got = timed(model, prompts, new, spec, rounds)
        rate_plain, _ = timed(model, prompts, new, rounds=rounds)  # again: the machine drifts
        plain = (base + rate_plain) / 2
        kept = spec.kept / spec.guessed if spec.guessed else 0.0
        print(f"| {name} | {label} | {plain:.1f} | {rate:.1f} | **{rate / plain:.2f}x** | "
              f"{kept:.2f} ({spec.guessed // rounds} guessed a run) | {got == want} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="quickstart/checkpoint/run1")
    p.add_argument("--corpus", default="quickstart/corpus/test")
    p.add_argument("--draft", default=None, help="a draft model directory for --model")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--lookup", type=int, default=10, help="prompt lookup tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    device = setup("cpu", args.threads)
    model, enc, _, _ = load_for_inference(args.model, "cpu")
    n_ctx = model.config.n_ctx
    texts = [f.read_text(encoding="utf-8") for f in sorted(Path(args.corpus).glob("*.txt"))]
    passages = [ids for ids in (enc.encode(t) for t in texts) if len(ids) >= n_ctx // 2]
    passages = passages[:args.passages]
    grounded = [ids[:n_ctx // 2 - 8] + enc.encode("\n\n") + ids[:8] for ids in passages]
    opened = [ids[:16] for ids in passages]
    speculators = {f"prompt lookup {args.lookup}": PromptLookup(args.lookup)}
    if args.draft:
        draft, _, _, _ = load_for_inference(args.draft, "cpu")
        speculators["draft 4"] = DraftModel(draft, 4)
    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/speculative.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {len(passages)} held-out passages, batch 1, greedy, median of {args.rounds} rounds")
    print("| prompts | guesses | plain tok/s | speculative tok/s | ratio | kept | same output |")
    print("|---|---|---|---|---|---|---|")
    compare(f"input-grounded ({args.model})", model, grounded, lambda p: n_ctx - len(p) + 1,
            speculators, args.rounds)
    compare(f"open-ended ({args.model})", model, opened, lambda p: 64, speculators, args.rounds)
    torch.manual_seed(0)
    big = GPT(SHAPES["124M"]).eval()
    rng = np.random.default_rng(0)
    random_prompts = [[int(t) for t in rng.integers(0, 50257, 16)] for _ in range(2)]
    compare("open-ended (random 124M-shape weights)", big, random_prompts, lambda p: 64,
            {f"prompt lookup {args.lookup}": PromptLookup(args.lookup)}, args.rounds)
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

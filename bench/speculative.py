"""Speculative decoding at batch 1, greedy: tokens/s with prompt lookup (and a draft model)
against plain decoding of the same model, in one run, with identical output checked.

Input-grounded: the prompt is a passage of held-out text followed by its first words again,
so the continuation can quote it (as code edits and summaries quote their input). Open-ended:
the prompt is the passage's first 16 tokens. Both with the model given (default: the
quickstart's, ``python -m gpt2 quickstart``): a small model, whose step is mostly fixed costs.
Then the rounds it went through (guesses checked and kept, per round) are replayed on the
124M shape (prompt lookup) and on a 124M draft for a 774M target (``--draft``): the real
kernels of those shapes on random weights, whose speed does not depend on the values.

    python bench/speculative.py --model quickstart/checkpoint/run1 --corpus quickstart/corpus/test
"""

from __future__ import annotations

import argparse
import contextlib
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


def trace(model, prompts, new, speculator) -> list[list[tuple]]:
    """Each prompt's rounds under ``speculator`` (greedy): ("step",) for a plain step of the
    model, ("check", guessed, kept) for a forward that checked guesses."""
    import gpt2.speculative as spec
    from gpt2.decoder import Decoder

    events: list[tuple] = []
    accept, feed = spec.accept, Decoder.feed

    def recording_accept(guesses, *a, **k):
        n, token = accept(guesses, *a, **k)
        events.append(("check", len(guesses), n))
        return n, token

    def recording_feed(self, tokens):
        if self.model is model:
            events.append(("step",))
        return feed(self, tokens)

    spec.accept, Decoder.feed = recording_accept, recording_feed
    try:
        out = []
        for p in prompts:
            events = []
            decode(model, torch.tensor([p]), new(p), temperature=0, speculator=speculator)
            out.append(events)
    finally:
        spec.accept, Decoder.feed = accept, feed
    return out


def replay(target, draft, prompt_len: int, rounds: list[tuple], repeats: int):
    """(tokens, seconds speculative, seconds plain): ``rounds`` (from :func:`trace`) run on
    these models' shapes with their real kernels (the captured step for plain steps, the
    draft's steps, checking forwards and cut-backs), against plain steps for as many tokens."""
    from gpt2.capture import capture_enabled, shared_step
    from gpt2.decoder import Decoder
    from gpt2.kernels import decode_kernels

    step = shared_step() if capture_enabled() else None
    tokens = sum(1 if r[0] == "step" else r[2] + 1 for r in rounds)
    ctx = torch.randint(0, 256, (1, prompt_len))
    one = torch.tensor([7])
    spec_s, plain_s = [], []
    with torch.inference_mode(), decode_kernels(target), \
            (decode_kernels(draft) if draft is not None else contextlib.nullcontext()):
        for _ in range(repeats):
            dec = Decoder(target, ctx, tokens + 16, step=step)
            ddec = Decoder(draft, ctx, tokens + 16, step=step) if draft is not None else None
            t = time.perf_counter()
            for r in rounds:
                if r[0] == "step":
                    dec.feed(one)
                    if ddec is not None:
                        ddec.feed(one)
                    continue
                _, g, n = r
                if ddec is not None:
                    for _ in range(g + 1):
                        ddec.feed(one)
                logits = dec.extend(torch.full((1, g + 1), 7))
                dec.retract(g + 1, [n + 1], logits[:, n])
                if ddec is not None:
                    ddec.retract(g + 1, [n + 1], ddec.logits)
            spec_s.append(time.perf_counter() - t)
            dec = Decoder(target, ctx, tokens + 16, step=step)
            t = time.perf_counter()
            for _ in range(tokens):
                dec.feed(one)
            plain_s.append(time.perf_counter() - t)
    return tokens, float(np.median(spec_s)), float(np.median(plain_s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="quickstart/checkpoint/run1")
    p.add_argument("--corpus", default="quickstart/corpus/test")
    p.add_argument("--draft", default=None, help="a draft model directory for --model")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--lookup", type=int, default=10, help="prompt lookup tokens")
    p.add_argument("--target_shape", default="774M", help="the target's shape in the replay")
    p.add_argument("--replay_passages", type=int, default=4,
                   help="passages whose rounds are replayed")
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
    print(f"\n# the same rounds (how many guesses were checked and kept, from the trained "
          f"model above, input-grounded) replayed on larger shapes (random weights), against "
          f"plain decoding of as many tokens; median of {args.rounds}")
    print("| guesses | target shape | draft shape | tokens | plain tok/s | speculative tok/s | "
          "ratio |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    big = GPT(SHAPES["124M"]).eval()
    lookup_rounds = trace(model, grounded, lambda p: n_ctx - len(p) + 1,
                          PromptLookup(args.lookup))
    plan = [(f"prompt lookup {args.lookup}", big, None, "124M", "-", lookup_rounds)]
    if args.draft:
        draft_rounds = trace(model, grounded, lambda p: n_ctx - len(p) + 1,
                             DraftModel(draft, 4))
        plan.append(("draft 4", None, GPT(SHAPES["124M"]).eval(), args.target_shape, "124M",
                     draft_rounds))
    for label, target, small, tshape, dshape, rounds in plan:
        if target is None:
            del big
            target = GPT(SHAPES[tshape]).eval()
        flat = [r for prompt in rounds[:args.replay_passages] for r in prompt]
        tokens, spec_s, plain_s = replay(target, small, n_ctx // 2, flat, args.rounds)
        print(f"| {label} | {tshape} | {dshape} | {tokens} | {tokens / plain_s:.1f} | "
              f"{tokens / spec_s:.1f} | **{plain_s / spec_s:.2f}x** |")
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

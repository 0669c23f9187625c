"""Packed against padded training on short examples: example tokens per second, same run.

Examples of instruction-set lengths (log-normal, median ~200 tokens, 16..n_ctx) are batched the
two ways train.py does: packed several to an n_ctx row (each attending only to itself), or one
per row padded to the longest of its batch. Both run the same model, optimizer and number of
example tokens per step (about), interleaved; the figure is real (non-padding) tokens per
second, so wasted padding shows as a lower rate.

    python bench/packing.py                                  # CPU: "6x384" shape, n_ctx 1024
    python bench/packing.py --device cuda --shape 124M --rows 8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

import numpy as np
import torch

from common import SHAPES, load_note, machine, setup, timed_interleaved

from gpt2.data.examples import IGNORE, Example
from gpt2.model import GPT
from gpt2.training.batches import collate, pack_rows


def examples(n: int, n_ctx: int, n_vocab: int, median: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.7, n).astype(int), 16, n_ctx)
    out = []
    for length in lengths:
        ids = rng.integers(0, n_vocab, length).astype(np.int32)
        targets = ids.copy()
        targets[: length // 2] = IGNORE  # a prompt, then the answer
        out.append(Example(ids, targets))
    return out


def batches(exs: list[Example], n_ctx: int, rows: int, packing: bool, eot: int):
    """Batches of about ``rows * n_ctx`` example tokens each, the way ExampleBatches makes them."""
    out, grouped = [], pack_rows(exs, n_ctx, packing)
    if packing:  # best-fit sorts rows by fill; the trainer shuffles them, as here
        grouped = [grouped[i] for i in np.random.default_rng(1).permutation(len(grouped))]
        for i in range(0, len(grouped) - rows + 1, rows):
            out.append(collate(grouped[i:i + rows], n_ctx, eot))
        return out
    budget, group = rows * n_ctx, []
    for row in grouped:  # padded: as many examples per batch as the packed rows would hold
        group.append(row)
        if sum(len(r[0]) for r in group) >= budget:
            out.append(collate(group, max(len(r[0]) for r in group), eot))
            group = []
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shape", default=None, help=", ".join(SHAPES) + " (default 6x384 on CPU)")
    p.add_argument("--n_ctx", type=int, default=1024)
    p.add_argument("--rows", type=int, default=1, help="packed rows per step")
    p.add_argument("--median", type=int, default=200, help="median example length, tokens")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args.device, args.threads)
    shape = args.shape or ("124M" if device.type == "cuda" else "6x384")
    config = dataclasses.replace(SHAPES[shape], n_ctx=args.n_ctx)
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    exs = examples(600, args.n_ctx, config.n_vocab, args.median)
    plans = {name: batches(exs, args.n_ctx, args.rows, name == "packed", 0)
             for name in ("packed", "padded")}
    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/packing.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {shape} with n_ctx {args.n_ctx}, fp32, AdamW; {len(exs)} examples, median "
          f"{int(np.median([len(e) for e in exs]))} tokens; packed: {args.rows} row(s) of "
          f"{args.n_ctx} per step; padded: as many examples per step, padded to the longest")
    state = {}
    steps = {}
    for name, plan in plans.items():
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        state[name] = {"i": 0, "real": [], "width": []}

        def step(m=m, opt=opt, plan=plan, s=state[name]):
            batch = plan[s["i"] % len(plan)].to(device)
            s["i"] += 1
            s["real"].append(int((batch.segments >= 0).sum()))
            s["width"].append(batch.inputs.numel())
            opt.zero_grad(set_to_none=True)
            m(batch.inputs, targets=batch.targets, segments=batch.segments).backward()
            opt.step()
        steps[name] = step
    times = timed_interleaved(steps, 1, args.iters, device)
    print("| batching | s / step (median) | example tokens / step | padding (timed; whole "
          "epoch) | example tokens/s |")
    print("|---|---|---|---|---|")
    rate = {}
    for name, t in times.items():
        real = np.mean(state[name]["real"][1:])
        pad = 1 - real / np.mean(state[name]["width"][1:])
        epoch = 1 - sum(int((b.segments >= 0).sum()) for b in plans[name]) / sum(
            b.inputs.numel() for b in plans[name])
        rate[name] = real / np.median(t)
        print(f"| {name} | {np.median(t):.2f} | {real:,.0f} | {pad:.0%}; {epoch:.0%} | "
              f"{rate[name]:,.0f} |")
    print(f"\npacked / padded: {rate['packed'] / rate['padded']:.2f}x")
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

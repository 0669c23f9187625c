"""Micro-benchmarks behind the optimisation decisions in bench/RESULTS.md (one piece at a time).

    python bench/micro.py adamw      # AdamW step on ~118M fp32 parameters: foreach vs fused vs loop
    python bench/micro.py pad        # head matmul with the vocabulary padded 50257 -> 50304
    python bench/micro.py loss       # loss head forward+backward: cross_entropy vs token_loss
    python bench/micro.py decode     # one 124M decode step: torch.cat cache vs empty_kv_cache
    python bench/micro.py linear     # CPU: F.linear (sgemm) vs oneDNN matmul, 1 to 1024 rows

Each prints best-of-N milliseconds, the variants timed alternately (see common.timed_interleaved).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import load_note, machine, setup, timed_interleaved

from gpt2.model import GPT, GPTConfig, empty_kv_cache, next_token_targets, token_loss


def report(title: str, times: dict[str, list[float]]) -> None:
    print(f"{title}: " + ", ".join(f"{k} {min(v) * 1e3:.1f} ms" for k, v in times.items()))


def adamw(device: torch.device) -> None:
    torch.manual_seed(0)
    init = [torch.randn(768, 4 * 768, device=device) for _ in range(40)]  # ~118M values
    grads = [torch.randn_like(p) * 1e-3 for p in init]
    opts = {}
    for impl in ("foreach", "fused", "forloop"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        flag = {"forloop": {"foreach": False}}.get(impl, {impl: True})
        opts[impl] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **flag)
    report("AdamW step, 118M params", timed_interleaved({k: o.step for k, o in opts.items()}, 1, 5, device))
    a, b = (o.param_groups[0]["params"] for o in (opts["foreach"], opts["fused"]))
    print(f"  fused vs foreach max difference: {max((x - y).abs().max().item() for x, y in zip(a, b)):.1e}")


def pad(device: torch.device) -> None:
    w = torch.randn(50257, 768, device=device)
    for rows in (1024, 16):
        x = torch.randn(rows, 768, device=device)
        fns = {"50257": lambda: x @ w.t(),
               "padded 50304, view": lambda: (x @ F.pad(w, (0, 0, 0, 47)).t())[:, :50257],
               "padded 50304, contiguous": lambda: (x @ F.pad(w, (0, 0, 0, 47)).t())[:, :50257].contiguous()}
        report(f"head forward, {rows} rows", timed_interleaved(fns, 1, 6, device))
    x = torch.randn(1024, 768, device=device)
    wp = torch.randn(50304, 768, device=device)
    g, gp = torch.randn(1024, 50257, device=device), torch.randn(1024, 50304, device=device)
    report("head backward, 1024 rows", timed_interleaved(
        {"50257": lambda: (g @ w, g.t() @ x), "50304": lambda: (gp @ wp, gp.t() @ x)}, 1, 6, device))


def loss(device: torch.device) -> None:
    for B, T in ((1, 1024), (4, 256)):
        h0 = torch.randn(B, T, 768, device=device)
        w0 = torch.randn(50257, 768, device=device) * 0.02
        tokens = torch.randint(0, 50257, (B, T), device=device)

        def run(fn):
            def go():
                h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                fn(h, w).backward()
            return go

        targets = next_token_targets(tokens)
        fns = {"sliced logits (cross_entropy)": run(lambda h, w: F.cross_entropy(
                   (h @ w.t())[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())),
               "shifted targets (cross_entropy)": run(lambda h, w: F.cross_entropy(
                   (h @ w.t()).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)),
               "token_loss": run(lambda h, w: token_loss(h, w, targets)),
               "token_loss chunk 256": run(lambda h, w: token_loss(h, w, targets, chunk=256)),
               "token_loss chunk 1024": run(lambda h, w: token_loss(h, w, targets, chunk=1024))}
        report(f"loss head fwd+bwd, {B} x {T}", timed_interleaved(fns, 1, 4, device))


def decode(device: torch.device) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()
    for B in (1, 16):
        context = torch.randint(0, 50257, (B, 128), device=device)
        token = torch.randint(0, 50257, (B, 1), device=device)
        with torch.inference_mode():
            state = {"torch.cat": model(context, use_cache=True)[1],
                     "empty_kv_cache": model(context, past=empty_kv_cache(
                         model.config, B, 1024, device=device), use_cache=True)[1]}

            def step(name):
                def go():
                    state[name] = model(token, past=state[name], use_cache=True)[1]
                return go

            report(f"decode step, batch {B}, cache 128+", timed_interleaved(
                {name: step(name) for name in state}, 2, 16, device))


def linear(device: torch.device) -> None:
    """The rule behind gpt2.model.Linear: which kernel wins for how many rows (CPU, fp32)."""
    if device.type != "cpu":
        print("linear: CPU only (the oneDNN path is a CPU kernel choice)")
        return
    torch.manual_seed(0)
    E = 768
    for rows in (1, 4, 16, 64, 256, 1024):
        for k, n in ((E, 3 * E), (4 * E, E), (E, 50257)):
            if rows >= 256 and n == 50257:
                continue  # the head never runs on many rows without gradients outside eval
            w, x = torch.randn(n, k, device=device), torch.randn(rows, k, device=device)
            b = None if n == 50257 else torch.randn(n, device=device)
            with torch.no_grad():
                times = timed_interleaved({
                    "F.linear": lambda: F.linear(x, w, b),
                    "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
                }, 2, 7, device)
            a, o = min(times["F.linear"]), min(times["oneDNN"])
            print(f"rows {rows:5d}, [{k} -> {n}]: F.linear {a * 1e3:.2f} ms, oneDNN "
                  f"{o * 1e3:.2f} ms, {a / o:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["adamw", "pad", "loss", "decode", "linear"], nargs="+")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args.device, args.threads)
    print(f"# {machine(device, args.threads)}")
    for what in args.what:
        globals()[what](device)
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step throughput and MFU: our GPT against transformers' GPT2LMHeadModel, same run.

One step is forward + next-token loss + backward + AdamW update, on identical config, weights
and batch for both implementations. FLOPs per token follow the PaLM paper's appendix B:
6N + 12·L·n_embd·T (N = parameters that do matmuls: everything but the position table).

    python bench/train.py                                   # CPU: small and 124M at 1 x 256
    python bench/train.py --device cuda                     # GPU: 124M, 355M at 8 x 1024, bf16
    python bench/train.py --device cuda --compile --shapes 124M --batch 16
    python bench/train.py --loss chunked                    # our chunked cross-entropy

The CPU peak is an estimate from /proc/cpuinfo (cores x SIMD lanes x FMA x clock); the GPU
peak is the data sheet's dense bf16 figure. Both are printed with the result.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from common import SHAPES, hf_twin, load_note, machine, peak_flops, setup, timed_interleaved

from gpt2.model import GPT


def flops_per_token(model: GPT, seq_len: int) -> float:
    c = model.config
    n = model.num_params() - model.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * seq_len


def make_step(impl: str, model, tokens: torch.Tensor, opt: torch.optim.Optimizer,
              amp: torch.dtype | None, compile: bool):
    device_type = tokens.device.type

    def forward_loss() -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            if impl == "hf":
                # transformers shifts labels itself: the same next-token loss as ours.
                return model(tokens, labels=tokens).loss
            # What the trainer runs: the loss inside the model's forward.
            return model(tokens, targets=tokens, loss_chunk=256 if impl == "chunked" else 0)

    # Compile forward + loss (backward follows through AOTAutograd); the fused update stays eager.
    loss_fn = torch.compile(forward_loss) if compile else forward_loss

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_optimizer(model, impl: str) -> torch.optim.Optimizer:
    # fused: one kernel per parameter group on CUDA, a vectorised loop on CPU (8x foreach there).
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **{impl: True})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES)
                   + " (default: small,124M on CPU; 124M,355M on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 8 on CUDA")
    p.add_argument("--seq", type=int, default=None, help="default 256 on CPU, 1024 on CUDA")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16 = autocast with fp32 master weights (default: fp32 CPU, bf16 CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model's forward + loss (meant for CUDA)")
    p.add_argument("--impl", default="ours,hf",
                   help="comma list: ours (model(tokens, targets=...): token_loss in one buffer), "
                        "chunked (the same with loss_chunk=256), hf (transformers' GPT2LMHeadModel with labels)")
    p.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                   help="AdamW implementation, the same for both models")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    device = setup(args.device, args.threads)
    gpu = device.type == "cuda"
    shapes = (args.shapes or ("124M,355M" if gpu else "small,124M")).split(",")
    batch = args.batch or (8 if gpu else 1)
    seq = args.seq or (1024 if gpu else 256)
    precision = args.precision or ("bf16" if gpu else "fp32")
    amp = torch.bfloat16 if precision == "bf16" else None
    impls = args.impl.split(",")
    peak, peak_how = peak_flops(device, args.threads)

    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# batch {batch} x {seq}, {precision}, compile={args.compile}, "
          f"AdamW {args.optimizer}, {args.warmup} warmup + {args.iters} timed steps")
    print(f"# MFU peak: {peak_how}")
    print("| shape | impl | step ms (best) | tokens/s | MFU | vs transformers |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        torch.manual_seed(0)
        ours = GPT(SHAPES[shape]).to(device).train()
        fpt = flops_per_token(ours, seq)
        tokens = torch.randint(0, ours.config.n_vocab, (batch, seq), device=device,
                               generator=torch.Generator(device).manual_seed(0))
        # Each implementation trains its own copy of the same weights.
        models = {impl: copy.deepcopy(ours) for impl in impls if impl != "hf"}
        if "hf" in impls:
            models["hf"] = hf_twin(ours).train()
        steps, first_loss = {}, {}
        for impl, model in models.items():
            opt = build_optimizer(model, args.optimizer)
            step = make_step(impl, model, tokens, opt, amp, args.compile)
            first_loss[impl] = float(step())  # also the first warmup step
            steps[impl] = step
        # Interleaved, so that a busy machine slows both implementations alike.
        times = timed_interleaved(steps, args.warmup, args.iters, device)
        results = {impl: min(t) for impl, t in times.items()}
        # Same weights and batch: the first losses must agree (a step of one implementation
        # moves weights another shares, so only the first loss of each is comparable).
        ref = first_loss.get("hf", next(iter(first_loss.values())))
        for impl, loss in first_loss.items():
            assert abs(loss - ref) < 1e-3 * max(1.0, abs(ref)), f"losses differ: {first_loss}"
        for impl, sec in results.items():
            tps = batch * seq / sec
            mfu = tps * fpt / peak
            ratio = (f"{results['hf'] / sec:.2f}x" if "hf" in results else "")
            print(f"| {shape} | {impl} | {sec * 1e3:.0f} | {tps:,.0f} | {mfu:.1%} | {ratio} |",
                  flush=True)
        del models, ours, steps
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling throughput: gpt2.sampling.sample_sequence against transformers' generate, same run.

Both continue the same random prompt with the same weights (random ones: speed does not depend
on the values), top-k sampling with the KV cache on, for exactly ``--new`` tokens (no early stop).
Tokens/s counts new tokens over all rows: batch x new / seconds, prompt processing included.

    python bench/sample.py                                   # CPU: 124M, batch 1 and 16
    python bench/sample.py --device cuda --precision bf16 --batch 1,16,64
    python bench/sample.py --shapes 124M --batch 1 --new 256 --top_k 0
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import SHAPES, hf_twin, load_note, machine, setup, timed_interleaved

from gpt2 import kernels
from gpt2.model import GPT
from gpt2.sampling import sample_sequence


def without_onednn(fn):
    """``fn`` with every linear layer on ATen's default sgemm (the oneDNN decode path off)."""
    def run():
        saved, kernels.ONEDNN_MAX_ROWS = kernels.ONEDNN_MAX_ROWS, 0
        try:
            return fn()
        finally:
            kernels.ONEDNN_MAX_ROWS = saved
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", default="124M", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="tokens to generate")
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="weights' dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--impl", default="ours,sgemm,hf",
                   help="comma list: ours (gpt2.sampling.sample_sequence), sgemm (the same with "
                        "the CPU oneDNN linear path off), hf (transformers generate)")
    p.add_argument("--warmup", type=int, default=0, help="extra untimed runs after the checked one")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    device = setup(args.device, args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.precision or ("bf16" if device.type == "cuda" else "fp32")]
    impls = args.impl.split(",")
    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/sample.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# prompt {args.prompt} + {args.new} new tokens, top_k {args.top_k}, {dtype}, "
          f"1 checked + {args.warmup} warmup + {args.iters} timed runs (best shown)")
    print("| shape | batch | impl | seconds | new tokens/s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        torch.manual_seed(0)
        ours = GPT(SHAPES[shape]).to(device=device, dtype=dtype).eval()
        hf = hf_twin(ours).eval() if "hf" in impls else None
        if hf is not None:
            hf.generation_config.eos_token_id = None  # never stop early: fixed work per run
            hf.generation_config.pad_token_id = 0
        for batch in (int(b) for b in args.batch.split(",")):
            context = torch.randint(0, ours.config.n_vocab, (batch, args.prompt), device=device,
                                    generator=torch.Generator(device).manual_seed(batch))
            fns = {}
            if "ours" in impls:
                fns["ours"] = lambda: sample_sequence(ours, args.new, context, top_k=args.top_k,
                                                      seed=0)
            if "sgemm" in impls:
                fns["sgemm"] = without_onednn(lambda: sample_sequence(
                    ours, args.new, context, top_k=args.top_k, seed=0))
            if hf is not None:
                mask = torch.ones_like(context)

                def run_hf():
                    with torch.inference_mode():
                        return hf.generate(context, attention_mask=mask, do_sample=True,
                                           top_k=args.top_k, top_p=1.0, temperature=1.0,
                                           max_new_tokens=args.new, min_new_tokens=args.new,
                                           use_cache=True)
                fns["hf"] = run_hf
            outs = {}
            for name, fn in fns.items():  # a warmup run that checks the output, too
                outs[name] = fn()
                assert outs[name].shape == (batch, args.prompt + args.new), (name, outs[name].shape)
            if "ours" in outs and "sgemm" in outs:  # fp32 rounding only: a rare token may differ
                same = (outs["ours"] == outs["sgemm"]).float().mean().item()
                print(f"# batch {batch}: ours and sgemm agree on {same:.1%} of the tokens")
            times = timed_interleaved(fns, args.warmup, args.iters, device)
            best = {name: min(t) for name, t in times.items()}
            for name, sec in best.items():
                ratio = f"{best['hf'] / sec:.2f}x" if "hf" in best else ""
                print(f"| {shape} | {batch} | {name} | {sec:.2f} | {batch * args.new / sec:,.1f} "
                      f"| {ratio} |", flush=True)
        del ours, hf
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distributed training throughput and FSDP memory: run it under torchrun where GPUs exist.

One step = forward + loss + backward + AdamW update on random tokens, fresh weights of a GPT-2
shape. Rank 0 prints one JSON line: tokens/s summed over ranks, per-rank peak memory.

    python bench/distributed.py --model 124M                          # 1 GPU, no DDP wrapper
    torchrun --nproc_per_node 1 bench/distributed.py --model 124M     # 1 GPU, DDP wrapper
    torchrun --nproc_per_node 8 bench/distributed.py --model 124M     # 8 GPUs, DDP
    torchrun --nproc_per_node 8 bench/distributed.py --model 1558M --fsdp --batch 1
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/distributed.py --model tiny  # CPU, gloo

Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU without DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from gpt2.model import GPT, GPTConfig  # noqa: E402
from gpt2.training import distributed  # noqa: E402
from gpt2.training.parallelize import parallelize  # noqa: E402

SHAPES = {  # (n_embd, n_head, n_layer)
    "tiny": (128, 4, 2), "124M": (768, 12, 12), "355M": (1024, 16, 24),
    "774M": (1280, 20, 36), "1558M": (1600, 25, 48),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=SHAPES, default="124M")
    p.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fsdp", action="store_true")
    a = p.parse_args()

    info = distributed.init("auto")
    dev = info.device
    e, h, n = SHAPES[a.model]
    vocab = 50257 if a.model != "tiny" else 512
    seq = min(a.seq, 1024) if a.model != "tiny" else min(a.seq, 128)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=vocab, n_ctx=seq, n_embd=e, n_head=h, n_layer=n)).to(dev)
    wrapped = parallelize(model, info, fsdp=a.fsdp, compile=False,
                          checkpoint_blocks=[]).train_model
    if info.launcher != "none" and not info.enabled:  # torchrun with 1 process: DDP anyway
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else None
    tokens = torch.randint(0, vocab, (a.batch, seq), device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if amp:
            with amp:
                loss = wrapped(tokens, targets=tokens)
        else:
            loss = wrapped(tokens, targets=tokens)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    world = max(1, info.world_size)
    mode = "fsdp" if a.fsdp and info.enabled else ("ddp" if info.launcher != "none" else "plain")
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    peaks = distributed.all_gather_object(peak, info) if info.enabled else [peak]
    if info.is_main:
        print(json.dumps({"model": a.model, "mode": mode, "ranks": world, "device": str(dev),
                          "batch_per_rank": a.batch, "seq": seq,
                          "tokens_per_s": round(world * a.batch * seq * a.steps / dt, 1),
                          "peak_gib_per_rank": peaks}))
    distributed.shutdown()


if __name__ == "__main__":
    main()

"""Peak memory of fine-tuning: the estimate for every released size and memory option, and, for
the sizes a CPU can run, a measured peak to hold the estimate to.

    python bench/memory.py                     # estimate table (1 x 1024, fused AdamW as on GPU)
    python bench/memory.py --measure           # CPU: 124M, one config per fresh process
    python bench/memory.py --measure --device cuda --shapes 124M,355M   # GPU: max_memory_allocated

A measurement runs two full training steps (forward, loss, backward, AdamW) in a fresh process,
so the optimizer state exists and the peak is the step's own. On CPU the peak is the process's
peak RSS (getrusage) minus its RSS just before the model was built; on CUDA it is
torch.cuda.max_memory_allocated. Both are compared with gpt2.memory_estimate's ``peak``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import SHAPES, load_note, machine, setup

from gpt2.training.memory import GB, estimate_memory

HERE = Path(__file__).resolve().parent
BUDGET_GB = 24
# Left for the CUDA context (~0.5 GB) and allocator fragmentation when judging "fits in 24 GB".
MARGIN_GB = 2

# (label, estimate_memory keywords). Each adds one option to a plain fp32 AdamW fine-tune.
OPTIONS = [
    ("fp32, AdamW", {}),
    ("+ memory saving (checkpoint every block)", {"activation_checkpointing": True}),
    ("bf16 autocast", {"precision": "bf16"}),
    ("bf16 + memory saving", {"precision": "bf16", "activation_checkpointing": True}),
    ("fp32 + memory saving + Adafactor",
     {"activation_checkpointing": True, "optimizer": "adafactor"}),
    ("bf16 + memory saving + Adafactor + chunked loss",
     {"precision": "bf16", "activation_checkpointing": True, "optimizer": "adafactor",
      "chunked_loss": True}),
    ("bf16 + memory saving, FSDP x2", {"precision": "bf16", "activation_checkpointing": True,
                                       "fsdp_world_size": 2}),
    ("bf16 + memory saving, FSDP x4", {"precision": "bf16", "activation_checkpointing": True,
                                       "fsdp_world_size": 4}),
]

# What --measure runs: (label, options). Memory saving and the chunked loss against the plain step.
MEASURED = [
    ("fp32, AdamW", {}),
    ("+ memory saving", {"activation_checkpointing": True}),
    ("+ chunked loss", {"chunked_loss": True}),
    ("+ memory saving + chunked loss", {"activation_checkpointing": True, "chunked_loss": True}),
]


def estimate_table(batch: int, seq: int) -> None:
    shapes = ["124M", "355M", "774M", "1558M"]
    print(f"Estimated peak GiB, batch {batch} x {seq}, fused AdamW update (CUDA); "
          f"* = fits {BUDGET_GB} GiB with {MARGIN_GB} GiB left for CUDA context and fragmentation")
    print("| options | " + " | ".join(shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for label, kw in OPTIONS:
        cells = []
        for shape in shapes:
            peak = estimate_memory(SHAPES[shape], batch, seq, fused_optimizer=True, **kw).peak / GB
            cells.append(f"{peak:.1f}{' *' if peak <= BUDGET_GB - MARGIN_GB else ''}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(spec: dict) -> dict:
    """One measurement, in this (fresh) process: two training steps of one configuration."""
    from gpt2.training.parallelize import apply_activation_checkpointing
    from gpt2.model import GPT
    from gpt2.training.memory import CHUNK_ROWS

    device = setup(spec["device"], spec["threads"])
    config = SHAPES[spec["shape"]]
    opts = spec["options"]
    torch.ones(64, 64) @ torch.ones(64, 64)  # load the BLAS before taking the baseline
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_bytes()
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    if opts.get("activation_checkpointing"):
        apply_activation_checkpointing(model, list(range(config.n_layer)))
    fused = spec["optimizer_impl"] == "fused"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5,
                            **({"fused": True} if fused else {"foreach": True}))
    tokens = torch.randint(0, config.n_vocab, (spec["batch"], spec["seq"]), device=device)
    t0 = time.perf_counter()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        # what train.py runs: the loss inside the forward (token_loss, one buffer or chunked)
        loss = model(tokens, targets=tokens,
                     loss_chunk=CHUNK_ROWS if opts.get("chunked_loss") else 0)
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / 2
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    est = estimate_memory(config, spec["batch"], spec["seq"], fused_optimizer=fused, **opts)
    return {"measured": peak, "estimated": est.peak, "seconds_per_step": seconds,
            "loss": float(loss)}


def measure(args, device: torch.device) -> None:
    print(f"Measured peak of a training step (2 steps, fresh process each), batch {args.batch} x "
          f"{args.seq}, fp32, AdamW ({args.optimizer_impl}); "
          f"{'max_memory_allocated' if device.type == 'cuda' else 'peak RSS - RSS before the model'}"
          f"{', MALLOC_MMAP_THRESHOLD_=131072' if device.type == 'cpu' and args.fixed_malloc else ''}")
    print("| shape | options | measured GiB | estimated GiB | estimate / measured | s/step |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for label, opts in MEASURED:
            spec = {"shape": shape, "options": opts, "batch": args.batch, "seq": args.seq,
                    "device": device.type, "threads": args.threads,
                    "optimizer_impl": args.optimizer_impl}
            # A fixed mmap threshold makes glibc return every large freed block to the system,
            # so peak RSS tracks the peak of live tensors instead of the heap's high-water mark.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if args.fixed_malloc else None
            out = subprocess.run([sys.executable, str(HERE / "memory.py"), "--child", json.dumps(spec)],
                                 capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                print(f"| {shape} | {label} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {shape} | {label} | {r['measured'] / GB:.2f} | {r['estimated'] / GB:.2f} | "
                  f"{r['estimated'] / r['measured']:.2f} | {r['seconds_per_step']:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="run training steps and measure peaks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default="124M", help="shapes to measure (comma list)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer_impl", default="fused", choices=["fused", "foreach"],
                   help="AdamW implementation (foreach holds one more state-sized scratch)")
    p.add_argument("--default_malloc", dest="fixed_malloc", action="store_false",
                   help="CPU: keep glibc's dynamic mmap threshold (peak RSS then includes freed "
                        "heap memory not yet returned)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    device = setup(args.device, args.threads)
    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    estimate_table(args.batch, args.seq)
    if args.measure:
        print()
        measure(args, device)
        print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

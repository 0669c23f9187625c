"""Memory: activation checkpointing applied from outside the model, and the memory check.

    blocks = parse_blocks("every:2", config.n_layer)          # "all" | "every:N" | "0,3,5"
    apply_activation_checkpointing(model, blocks)
    line = check_fits(config, batch_size=1, precision="fp32", optimizer="adam",
                      device=torch.device("cpu"))          # UserError with advice if too big

The estimate itself (:mod:`gpt2.memory_estimate`) is arithmetic on hparams.json alone, so the
check runs before anything heavy is loaded and the trainer refuses a run that clearly cannot fit
instead of dying in the middle of step 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .memory_estimate import MemoryEstimate, estimate_memory
from .model import GPTConfig

GB = 1024**3
# Allocator fragmentation, the runtime itself and temporaries the estimate does not count.
HEADROOM = 1.1


def parse_blocks(spec: str, n_layer: int) -> list[int]:
    """Which transformer blocks to checkpoint: ``all``, ``every:N`` (0, N, 2N, ...) or ``0,3,5``."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n_layer))
    try:
        if spec.startswith("every:"):
            step = int(spec[len("every:"):])
            if step < 1:
                raise ValueError
            return list(range(0, n_layer, step))
        blocks = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"expected 'all', 'every:N' or a list like '0,3,5', got {spec!r}") from None
    bad = [b for b in blocks if not 0 <= b < n_layer]
    if bad or not blocks:
        raise ValueError(f"block indices must be in 0..{n_layer - 1}, got {spec!r}")
    return blocks


def apply_activation_checkpointing(model: nn.Module, blocks: list[int]) -> None:
    """Recompute the chosen blocks' activations during backward instead of storing them.

    Each block's ``forward`` is wrapped on the instance, so parameter names (and therefore saved
    weights) are unchanged. Only gradient-carrying calls without a KV cache are checkpointed:
    sampling and validation run the plain forward.
    """
    for i in blocks:
        block = model.h[i]
        plain = block.forward

        def forward(x, past=None, _plain=plain):
            if past is None and torch.is_grad_enabled():
                return checkpoint(_plain, x, use_reentrant=False)
            return _plain(x, past)

        block.forward = forward


def free_bytes(device: torch.device) -> int | None:
    """Memory the training could still use: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    # A container's cgroup limit can be far below what the host reports.
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            used = int(open(used_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            cg_free = int(limit) - used
            available = cg_free if available is None else min(available, cg_free)
        break
    return available


def human(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1024**2:.0f} MB"


def memory_advice(est: MemoryEstimate, precision: str, memory_saving: bool, batch_size: int,
                  optimizer: str) -> str:
    """What to change when the estimate does not fit, biggest wins first."""
    tips = []
    if batch_size > 1:
        tips.append(f"--batch_size 1 --accumulate_gradients {batch_size}")
    if not memory_saving:
        tips.append("--memory_saving_gradients")
    if precision == "fp32":
        tips.append("--precision bf16")
    if optimizer in ("adam", "adamw"):
        tips.append("--optimizer adafactor or --only_train_transformer_layers")
    return "; try " + ", ".join(tips) if tips else "; use a smaller model or a bigger device"


def check_fits(config: GPTConfig, batch_size: int, precision: str, optimizer: str,
               device: torch.device, only_transformer: bool = False, checkpointed_blocks: int = 0,
               seq_len: int | None = None, force: bool = False, fsdp_world_size: int = 1,
               chunked_loss: bool = False) -> str:
    """Estimate one training step's peak memory and compare it with the device's free memory.

    Returns a one-line summary to print; raises UserError with advice when the run clearly
    cannot fit (unless ``force``). fp16 is counted as bf16: the same bytes per value.
    """
    est = estimate_memory(config, batch_size, seq_len,
                          precision="fp32" if precision == "fp32" else "bf16",
                          optimizer=optimizer, activation_checkpointing=checkpointed_blocks,
                          trainable="transformer" if only_transformer else "all",
                          fsdp_world_size=fsdp_world_size, chunked_loss=chunked_loss)
    need = int(est.peak * HEADROOM)
    free = free_bytes(device)
    summary = (f"weights {human(est.params)}, gradients {human(est.grads)}, optimizer "
               f"{human(est.optimizer)}, activations {human(est.activations + est.head)} -> "
               f"peak about {human(need)}" + (f" of {human(free)} free" if free else ""))
    if free is not None and need > free and not force:
        raise UserError(f"this run needs about {human(need)} but {device} has {human(free)} free"
                        + memory_advice(est, precision, checkpointed_blocks > 0, batch_size,
                                        optimizer) + " (or --skip_memory_check)")
    return summary

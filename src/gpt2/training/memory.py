"""How many bytes a GPT-2 training step needs, from hparams.json alone, and whether it fits.

    from gpt2.training.memory import estimate_memory, check_fits
    est = estimate_memory(config, batch_size=1, seq_len=1024, precision="bf16",
                          optimizer="adafactor", activation_checkpointing=True)
    print(est.describe())          # params 6.2 GB, grads 6.2 GB, optimizer 3.1 GB, ... peak 19.8 GB
    est.peak                       # bytes the framework's allocator must hand out at the worst moment
    line = check_fits(config, 1, "fp32", "adam", torch.device("cpu"))   # UserError with advice

The estimate is arithmetic on hparams.json alone, so the check runs before anything heavy is
loaded and the trainer refuses a run that clearly cannot fit instead of dying in step 1.

The model is this repository's ``gpt2.model.GPT`` trained with PyTorch: the counts below follow
what its autograd graph saves (checked against saved-tensor hooks and measured peaks in
tests/test_perf_ops.py and bench/memory.py). Not included: the CUDA context (~0.5 GB), the
allocator's fragmentation (typically 5-15 % on CUDA) and, on CPU, the Python process itself.

Options, as the training flags name them:

- precision: ``fp32``; ``bf16`` or ``fp16`` (autocast: fp32 master weights, 16-bit matmuls;
  the same bytes either way).
- optimizer: ``adam``/``adamw`` (two moments), ``adafactor`` (torch.optim.Adafactor: factored
  second moment, no first), ``sgd``.
- activation_checkpointing: False, True (every block) or a number of blocks.
- fsdp_world_size: parameters, gradients and optimizer state sharded over that many devices
  (FULL_SHARD, one FSDP unit per block); activations are not sharded.
- chunked_loss: the head computed ``chunk`` rows at a time (``token_loss(chunk=...)``).
- trainable: ``all`` or ``transformer`` (--only_train_transformer_layers: the h.* blocks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError
from ..model import GPTConfig, param_shapes
from ..runtime import PRECISIONS, free_memory
from .optim import OPTIMIZERS

GB = 1024**3  # GiB, as nvidia-smi and torch report

# Activation bytes one block saves for backward, per token, in units of n_embd (counted with
# saved-tensor hooks): its input x (E), ln_1's output for c_attn (E), q/k/v (3E) and the
# attention output (E, which c_proj saves too: SDPA lays it out so that the head merge is a view),
# the mid-block residual (E), ln_2's output (E), c_fc's output (4E) for GELU and GELU's output
# (4E) for c_proj: 16E. Under bf16 autocast the residual stream stays fp32 (x and mid: 4 bytes)
# and the other 14E are bf16 (2 bytes).
_BLOCK_ACT_BYTES = {"fp32": 16 * 4, "bf16": 2 * 4 + 14 * 2}
# Rows per chunk of the chunked loss (train.py's --loss_chunk when it is on).
CHUNK_ROWS = 256


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by kind, and the peak of one training step (the largest of its phases)."""

    params: int          # this device's share of the weights
    grads: int
    optimizer: int
    activations: int     # saved for backward by every block and the final layer norm
    head: int            # the loss head's transient (logits and their gradients)
    temporaries: int     # autocast weight copies, gathered FSDP units, optimizer-step scratch
    peak: int            # the phase that needs the most, not the sum of the above

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in asdict(self).items() if k != "peak")
        return f"{parts} -> peak {self.peak / GB:.2f} GB"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def optimizer_bytes(shapes: list[tuple[int, ...]], optimizer: str) -> int:
    """Optimizer state for fp32 parameters of these shapes."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    total = 0
    for shape in shapes:
        n = _numel(shape)
        if optimizer in ("adam", "adamw"):
            total += 2 * 4 * n
        elif optimizer == "muon":  # (an upper bound: Muon's matrices keep one slot, not two)
            total += 2 * 4 * n
        elif optimizer == "adafactor":
            total += 4 * (shape[0] + _numel(shape[1:]) if len(shape) >= 2 else n)
    return total


def _block_activations(config: GPTConfig, tokens: int, precision: str) -> int:
    """Bytes one (not checkpointed) block saves for backward."""
    unit = "fp32" if precision == "fp32" else "bf16"
    saved = tokens * (_BLOCK_ACT_BYTES[unit] * config.n_embd + 4 * config.n_head)  # + SDPA lse
    if config.dropout:
        saved += 2 * tokens * config.n_embd  # a 1-byte mask per dropout site, 2 per block
    return saved


def _head_bytes(config: GPTConfig, tokens: int, precision: str, chunked: bool) -> int:
    """The loss head's transient at its worst moment (the start of backward)."""
    V, E = config.n_vocab, config.n_embd
    if chunked:
        # a chunk's fp32 logits (+ its 16-bit cast), and the gradients of hidden and weight
        # kept until backward (fp32 weight-gradient accumulator)
        rows = min(CHUNK_ROWS, tokens)
        return rows * V * (6 if precision != "fp32" else 4) + tokens * E * 4 + V * E * 4
    # model.token_loss: one fp32 [tokens, V] buffer holds the logits, then their gradient
    # (+ its 16-bit cast for backward's matmuls under autocast); the weight gradient is fresh.
    return tokens * V * (6 if precision != "fp32" else 4) + V * E * 4


def estimate_memory(config: GPTConfig, batch_size: int, seq_len: int | None = None, *,
                    precision: str = "fp32", optimizer: str = "adamw",
                    activation_checkpointing: bool | int = False, fsdp_world_size: int = 1,
                    chunked_loss: bool = False, trainable: str = "all",
                    fused_optimizer: bool = False) -> MemoryEstimate:
    """Peak bytes on one device for one training step (forward, loss, backward, optimizer step).

    ``fused_optimizer``: the update runs as fused kernels (CUDA AdamW ``fused=True``) with no
    scratch; otherwise PyTorch's foreach update briefly holds one more copy of the state's size.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if trainable not in ("all", "transformer"):
        raise ValueError(f"trainable must be 'all' or 'transformer', got {trainable!r}")
    if batch_size < 1 or fsdp_world_size < 1:
        raise ValueError("batch_size and fsdp_world_size must be >= 1")
    T = config.n_ctx if seq_len is None else seq_len
    if not 1 <= T <= config.n_ctx:
        raise ValueError(f"seq_len must be in 1..{config.n_ctx}, got {T}")
    E, L, N, W = config.n_embd, config.n_layer, batch_size * T, fsdp_world_size
    # One block's shapes, counted n_layer times: linear in depth (a hostile n_layer of 1e5
    # is refused in milliseconds, not after walking 1.2M parameters).
    shapes = param_shapes(dataclasses.replace(config, n_layer=1))
    block = [s for name, s in shapes.items() if name.startswith("h.")]
    root = [s for name, s in shapes.items() if not name.startswith("h.")]
    n_block, n_root = sum(map(_numel, block)), sum(map(_numel, root))  # root: wte, wpe, ln_f
    n_params = n_root + L * n_block
    n_train = L * n_block + (n_root if trainable == "all" else 0)
    params, grads = n_params * 4 // W, n_train * 4 // W  # fp32 master weights
    opt = (L * optimizer_bytes(block, optimizer) +
           (optimizer_bytes(root, optimizer) if trainable == "all" else 0)) // W

    # A checkpointed block keeps only its input; one block at a time is recomputed in backward.
    block_act = _block_activations(config, N, precision)
    n_ckpt = L if activation_checkpointing is True else min(int(activation_checkpointing), L)
    ckpt_act = N * E * 4
    final = 2 * N * E * 4  # ln_f's input and output (the head's input)
    activations = (L - n_ckpt) * block_act + n_ckpt * ckpt_act + final
    recompute = block_act if n_ckpt else 0
    head = _head_bytes(config, N, precision, chunked_loss)

    # 16-bit autocast keeps a 16-bit copy of every weight a matmul used until its backward ran.
    autocast_copies = 2 * n_params // W if precision != "fp32" else 0
    # FSDP gathers one block at a time (plus the next, prefetched) and the root unit, unsharded.
    gathered = (2 * n_block + n_root) * 4 if W > 1 else 0
    step_scratch = 0 if fused_optimizer or optimizer == "sgd" else n_train * 4 // W

    # Phase 1, forward + backward: walk backward from the last block; each block's activations
    # are freed as its gradients appear. The head's transient exists only at the start.
    block_grads = n_block * 4 // W
    root_grads = n_root * 4 // W if trainable == "all" else 0
    worst, freed = 0, 0
    for done in range(L + 1):  # blocks L-1, L-2, ... (the checkpointed ones come last)
        if done:
            freed += ckpt_act if L - done < n_ckpt else block_act
        worst = max(worst, activations - freed + root_grads + done * block_grads
                    + (head if done == 0 else recompute))
    fwd_bwd = params + opt + autocast_copies + gathered + worst
    # Phase 2, optimizer step: every gradient, the state and the update's scratch.
    step = params + grads + opt + step_scratch
    return MemoryEstimate(params=params, grads=grads, optimizer=opt, activations=activations,
                          head=head, temporaries=autocast_copies + gathered + step_scratch,
                          peak=max(fwd_bwd, step))


# --- does it fit? ------------------------------------------------------------------------------

# Allocator fragmentation, the runtime itself and temporaries the estimate does not count.
HEADROOM = 1.1


def free_bytes(device: torch.device) -> int | None:
    """Memory the training could still use: the accelerator's free memory, or the host's
    available RAM."""
    if device.type != "cpu":
        return free_memory(device)
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
    if n >= 1e6 * GB:  # a hostile hparams.json: the size, not thirty digits of it
        return f"{n / GB:.3g} GB"
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

"""Everything wrapped around a plain GPT for training, each applied from outside the model.

    parallel = parallelize(model, dist, fsdp=False, compile=False, checkpoint_blocks=[0, 1])
    loss = parallel.train_model(x, targets=y)           # DDP/FSDP-wrapped and compiled
    with parallel.no_sync(last_micro_step): loss.backward()
    model_to_save = parallel.full_model()               # the whole model, on rank 0

torchtitan's shape: the model module knows nothing of any of this. Each ``apply_*`` function
takes a plain module and returns it wrapped (or changed in place); :func:`parallelize` composes
them and returns a :class:`Parallel`, which is all the training loop holds, so the loop never
asks which wrappers are on. Under FSDP the weights are sharded across the ranks and every
forward is a collective; :class:`Parallel` hides that (a gathered whole model to save). The
optimizer state, sharded or not, is :mod:`.optim`'s.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model import GPT, Block
from ..runtime import compile_module
from . import distributed
from .distributed import DistInfo


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


class CheckpointedBlock(Block):
    """A transformer block that recomputes its activations during backward instead of storing
    them: the block's own submodules (so parameter names, state dicts and LoRA adapters are
    unchanged) under a forward that runs :func:`torch.utils.checkpoint.checkpoint`.

    Only gradient-carrying calls without a KV cache are checkpointed: sampling and validation
    run the plain forward. (torch's ``checkpoint_wrapper``, torchtitan's choice, renames every
    parameter under ``_checkpoint_wrapped_module``; the composable ``checkpoint()`` keeps names
    but fails under torch.compile.)
    """

    def __init__(self, block: Block):
        nn.Module.__init__(self)  # not Block's: the layers are the block's own
        for name, child in block.named_children():
            self.add_module(name, child)

    def forward(self, x, past=None, mask=None):
        if past is None and mask is None and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x, past, mask)


def apply_activation_checkpointing(model: GPT, blocks: list[int]) -> None:
    """Replace the chosen blocks with :class:`CheckpointedBlock` wrappers of themselves."""
    for i in blocks:
        if not isinstance(model.h[i], CheckpointedBlock):
            model.h[i] = CheckpointedBlock(model.h[i])


def apply_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    """A full replica per rank; DDP broadcasts rank 0's weights when it wraps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = None if dist.device.type == "cpu" else [dist.device.index]
    return DDP(model, device_ids=ids)


def apply_fsdp(model: GPT, dist: DistInfo) -> GPT:
    """FSDP2: shard each block, then the root (wte, wpe, ln_f), in place, over a mesh of this
    run's device type (FSDP2's default would take the machine's accelerator even for a run
    on the CPU).

    FSDP2 does not broadcast, so every rank must already hold the same weights (the same
    file, or the same seed for a fresh model).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_compile(model: nn.Module, device: torch.device) -> nn.Module:
    return compile_module(model, device)


class Parallel:
    """The model as built, the module that trains (wrapped, compiled), the module that
    evaluates, how their communication is synced, and the whole model to save."""

    def __init__(self, model: GPT, train_model: nn.Module, dist: DistInfo, sharded: bool):
        self.model = model              # names are what gpt2.load_model expects
        self.train_model = train_model  # wrapped and compiled: forward/backward run on it
        self.dist = dist
        self.sharded = sharded
        # Validation and sampling run the module as built, uncompiled. Under FSDP that is the
        # sharded module itself (fully_shard works in place): its forward is a collective.
        self.eval_model = model

    def no_sync(self, last_micro_step: bool):
        """Sync gradients only on the last backward of an accumulated update."""
        m = self.train_model  # (torch.compile's wrapper forwards attributes to the module)
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
            m.set_requires_gradient_sync(last_micro_step)
            return contextlib.nullcontext()
        if not last_micro_step and hasattr(m, "no_sync"):  # DDP
            return m.no_sync()
        return contextlib.nullcontext()

    def synced(self, training: bool = True):
        """Around a forward/backward of :attr:`train_model` (or a forward of
        :attr:`eval_model`): DDP's and FSDP's communication failing because of another rank
        becomes :class:`~.distributed.CommError`. Blocks that do not communicate are left
        alone."""
        talks = self.dist.enabled and self.dist.launcher != "horovod" if training \
            else self.sharded
        return distributed.collective(self.dist) if talks else contextlib.nullcontext()

    def full_model(self) -> GPT:
        """The model to write: itself, or under FSDP a CPU copy of the gathered weights (on
        rank 0; a collective, so every rank calls it)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, \
            get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        if not self.dist.is_main:
            return self.model
        with torch.device("meta"):  # no second random initialisation of a large model
            full = GPT(self.model.config)
        full.load_state_dict(sd, strict=False, assign=True)
        full.lm_head.weight = full.wte.weight  # assign=True untied them
        missing = [n for n, p in full.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"FSDP gather did not return {missing[:3]}")
        return full


def parallelize(model: GPT, dist: DistInfo, *, fsdp: bool, compile: bool,
                checkpoint_blocks: list[int]) -> Parallel:
    """Activation checkpointing, then DDP or FSDP (several processes), then torch.compile."""
    if checkpoint_blocks:
        apply_activation_checkpointing(model, checkpoint_blocks)
    wrapped, sharded = model, False
    if dist.enabled and dist.launcher != "horovod":
        sharded = fsdp
        wrapped = apply_fsdp(model, dist) if fsdp else apply_ddp(model, dist)
    return Parallel(model, apply_compile(wrapped, dist.device) if compile else wrapped, dist,
                    sharded)

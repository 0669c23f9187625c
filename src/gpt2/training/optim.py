"""Optimizers, the learning-rate schedule, and optimizer state as plain tensors (no pickle).

    opt = build_optimizer(model, "adamw", lr=3e-4, weight_decay=0.1)
    for step in range(1, max_steps + 1):
        set_lr(opt, lr_at(step, 3e-4, "cosine", warmup_steps=100, max_steps=max_steps))
        ...
    tensors, meta = optimizer_state(opt, model)     # -> safetensors + JSON (FSDP: gather=True)
    load_optimizer_state(opt, model, tensors, meta) # (FSDP: sharded=True)

The schedule is a pure function of the update number, so a resumed run needs to remember only
its step count to continue on the same curve.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..runtime import BACKENDS

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")
# --optimizer muon: the modded-nanogpt speedrun's settings for the Muon part (Keller Jordan's
# Muon: Newton-Schulz orthogonalized Nesterov momentum) and the Adam part's betas and eps.
MUON_LR, MUON_MOMENTUM = 0.05, 0.95
MUON_ADAM = dict(betas=(0.8, 0.95), eps=1e-10)
SCHEDULES = ("constant", "cosine")
# Cosine decays to this fraction of the peak rate rather than to zero (as Chinchilla did).
COSINE_FLOOR = 0.1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so that only matrices and embeddings are decayed.

    Biases and layer-norm gains are left alone: decaying them towards zero only hurts. Tied
    weights (lm_head = wte) appear once because named_parameters() deduplicates them.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _can_fuse(model: nn.Module) -> bool | None:
    """Fused Adam kernels: 6.6x faster steps on 124M on CPU (bench/micro.py adamw), same
    results to ~1e-7. Plain tensors on devices that have them (not FSDP's sharded DTensors)."""
    params = list(model.parameters())
    plain = all(type(p.data) is torch.Tensor for p in params)
    fused = all(p.device.type in BACKENDS and BACKENDS[p.device.type].fused_optimizer
                for p in params)
    return True if plain and fused else None


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the groups marked ``muon`` (the blocks' 2-D weights), AdamW
    for the others (embeddings and the tied head, biases, layer norms), as one optimizer: one
    state and one list of groups, which the state-dict API, the gradient scaler, clipping and
    the schedule see like any other. Each group keeps its own rate; :func:`set_lr` scales
    them all by the schedule (``lr_scale``)."""

    def __init__(self, params, lr: float = 1e-3, muon_lr: float = MUON_LR,
                 momentum: float = MUON_MOMENTUM, weight_decay: float = 0.0, fused=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, muon=False))
        for group in self.param_groups:
            if group["muon"]:
                group["lr"] = muon_lr
                group.setdefault("momentum", momentum)
            else:
                group.setdefault("fused", fused)
            group.setdefault("lr_scale", group["lr"] / lr if lr else 1.0)
        self._build()

    def _build(self) -> None:
        """The inner optimizers, over this one's groups (whose settings they take) and state."""
        muon = [g for g in self.param_groups if g["muon"]]
        adam = [g for g in self.param_groups if not g["muon"]]
        self._muon = torch.optim.Muon(muon, lr=muon[0]["lr"] if muon else MUON_LR,
                                      nesterov=True)
        self._adam = torch.optim.AdamW(adam, lr=adam[0]["lr"] if adam else 1e-3, **MUON_ADAM)
        self._bind()

    def _bind(self) -> None:
        """The inner optimizers work on this one's groups and state (also after a load)."""
        self._muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self._adam.param_groups = [g for g in self.param_groups if not g["muon"]]
        self._muon.state = self._adam.state = self.state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_muon" in self.__dict__:
            self._bind()
        else:  # a copy or an unpickled one: only the groups and the state travel
            self._build()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adam.step()
        return loss


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon takes the transformer blocks' matrices; AdamW the rest, decaying only the
    embeddings (the head is tied to wte)."""
    blocks = {id(p) for block in model.h for p in block.parameters()} \
        if hasattr(model, "h") else set()
    muon, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) in blocks:
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": muon, "muon": True, "weight_decay": weight_decay},
              {"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    muon_lr: float = MUON_LR, beta2: float = 0.999) -> torch.optim.Optimizer:
    """adam and sgd as the original (TF's Adam defaults: betas .9/.999, eps 1e-8; ``beta2``
    0.95 is GPT-3's and llm.c's), plus adamw (decoupled weight decay), adafactor (factored
    second moments: little optimizer memory) and muon (:class:`MuonAdamW`: ``muon_lr`` for the
    blocks' matrices, ``lr`` for the rest)."""
    if name == "muon":
        from ..io.tensors import unwrap

        return MuonAdamW(muon_groups(unwrap(model), weight_decay), lr=lr, muon_lr=muon_lr,
                         weight_decay=weight_decay, fused=_can_fuse(model))
    groups = param_groups(model, weight_decay)
    adam = dict(lr=lr, betas=(0.9, beta2), eps=1e-8, fused=_can_fuse(model))
    if name == "adam":
        return torch.optim.Adam(groups, **adam)
    if name == "adamw":
        return torch.optim.AdamW(groups, **adam)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup_steps: int = 0,
          max_steps: int | None = None, floor: float = COSINE_FLOOR) -> float:
    """Learning rate for update number ``step`` (1-based): linear warm-up, then the schedule
    (cosine: down to ``floor`` x ``lr`` at ``max_steps``)."""
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        if not max_steps:
            raise ValueError("the cosine schedule needs max_steps")
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        floor = lr * floor
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate on every group (times the group's ``lr_scale``: Muon's own rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The optimizer's parameters by name, in its order (the tied head once, as wte)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, gather: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's per-parameter state as ``{"<param name>/<key>": tensor}`` plus JSON
    metadata (optimizer class, parameter names, non-tensor values), keyed by parameter *name* so
    the file is readable and a mismatch with the model is detected instead of silently misapplied.

    One way for every wrapper: torch's distributed-checkpoint state-dict API, which also works
    without a process group. ``gather`` (FSDP): the whole state, gathered from the shards onto
    the CPU, a collective every rank calls. Otherwise CPU tensors are the live state, not
    copies: write them out before the next step.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, \
        get_optimizer_state_dict

    meta = {"class": type(optimizer).__name__, "params": _param_names(optimizer, model),
            "extra": {}}
    if not optimizer.state:  # no step yet (and torch's API would take one to make the state)
        return {}, meta
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if gather else None
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    tensors = {}
    for name, slots in osd.get("state", {}).items():  # (gathered: on rank 0 only)
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            elif value is not None:
                meta["extra"][f"{name}/{key}"] = value
    return tensors, meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         tensors: dict[str, torch.Tensor], meta: dict, sharded: bool = False
                         ) -> str | None:
    """Fill the optimizer's state from :func:`optimizer_state`'s output (``sharded``: each FSDP
    rank keeps its own shard of the whole state it read).

    Returns None on success, or a reason why the saved state does not fit this optimizer (other
    class, other trainable parameters), having changed nothing; the caller then starts with a
    fresh optimizer state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, \
        set_optimizer_state_dict

    names = _param_names(optimizer, model)
    if meta.get("class") != type(optimizer).__name__:
        return f"it was saved by {meta.get('class')}, this run uses {type(optimizer).__name__}"
    if meta.get("params") != names:
        return "it was saved for a different set of trainable parameters"
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(meta.get("extra", {}).items()):
        name, _, slot = key.rpartition("/")
        # Copied: the optimizer updates its state in place and must not share the caller's.
        state.setdefault(name, {})[slot] = value.clone() if isinstance(value, torch.Tensor) \
            else value
    if not state:
        return None  # saved before the first step: nothing to restore
    it = iter(names)
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [next(it) for _ in g["params"]]} for g in optimizer.param_groups]
    # (torch casts each slot to its parameter's dtype and device, steps stay where torch keeps
    # them; it first takes a step at learning rate 0 to create the state it then replaces)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=sharded))
    return None


class Optimization:
    """What one update does after the backward: the optimizer (Horovod's averaging one under
    ``train-horovod.py``), its learning-rate schedule, the fp16 gradient scaler and clipping.

        opt = Optimization(cfg, model, dist, precision)
        lr = opt.start_update(step)          # zero the gradients, set this update's rate
        opt.backward(loss)                    # scaled under fp16
        opt.finish_update()                   # unscale, clip, step, update the scaler
    """

    def __init__(self, cfg, model: nn.Module, dist, precision: str):
        from . import distributed

        self.cfg, self.model = cfg, model
        self.optimizer = distributed.wrap_optimizer(
            build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                            cfg.muon_lr, cfg.adam_beta2), model,
            dist, cfg.accumulate_gradients)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")

    def start_update(self, step: int) -> float:
        """Before update number ``step`` (1-based): fresh gradients, the schedule's rate."""
        cfg = self.cfg
        lr = lr_at(step, cfg.learning_rate, cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps,
                   cfg.min_lr_fraction)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def skip_update(self) -> None:
        """A non-finite loss: drop the gradients, change nothing."""
        self.optimizer.zero_grad(set_to_none=True)

    def finish_update(self, found_inf: torch.Tensor | None = None) -> None:
        """Unscale, clip and step, unless ``found_inf`` (a 0-d bool tensor on the device: the
        loss was not finite) says to skip the update. The fp16 scaler and the fused optimizers
        skip on the device (the kernel sees the flag; nothing waits for the device); other
        optimizers need the flag on the host first."""
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            # After DDP's all-reduce every rank clips the same averaged gradient (FSDP: the norm
            # of the full gradient is computed across shards).
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if found_inf is None or self.scaler.is_enabled():
            # (the scaler finds a non-finite loss in the gradients it unscales and skips)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False) and all(
                g.get("fused") for g in self.optimizer.param_groups):
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = found_inf.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif bool(found_inf):
            self.skip_update()
        else:
            self.optimizer.step()

"""The training loop: fine-tune a GPT-2 or train one from scratch, resumable to the bit.

    from gpt2.trainer import TrainConfig, train
    train(TrainConfig(dataset="my.txt", model_name="124M", max_steps=1000))

Everything around the model (device, precision, activation checkpointing, compile, DDP/FSDP)
is applied by the small functions below rather than inside the model or the loop.

Distributed runs (``torchrun``, ``mpirun``, ``srun``; see gpt2.distributed) wrap the model in
DDP, or shard it with FSDP2 under ``--fsdp``. Every rank starts from the same weights and seed,
draws its own windows, and averages gradients once per update (accumulation micro-steps skip the
all-reduce through :func:`no_sync`). Validation is split across ranks and all-reduced; only rank
0 prints, writes metrics and samples, and saves, while the others wait at a barrier. A stop
request on any rank is shared at the step boundary, so all ranks stop at the same step.

Resuming (``--restore_from latest``) restores weights, optimizer state, the step count (which
fixes the learning-rate schedule's position), the moving average, the data sampler's position
and every RNG, so a stopped and resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, memory, optim, tblog
from . import trainer_state as ts
from .distributed import DistInfo, pick_device
from .errors import UserError
from .model import GPT, GPTConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NONFINITE = 10  # consecutive skipped steps before giving up


@dataclass
class TrainConfig:
    """Every setting of a run; the command line (gpt2/train.py) maps onto it one to one."""

    dataset: str = ""
    model_name: str = "124M"
    models_dir: str = "models"
    model_dir: str | None = None
    combine: int = 50000
    encoding: str = "utf-8"
    batch_size: int = 1
    learning_rate: float = 2e-5
    accumulate_gradients: int = 1
    memory_saving_gradients: bool = False
    memory_saving_blocks: str = "all"
    only_train_transformer_layers: bool = False
    optimizer: str = "adam"
    noise: float = 0.0
    top_k: int = 40
    top_p: float = 0.0
    restore_from: str = "latest"
    run_name: str = "run1"
    sample_every: int = 100
    sample_length: int | None = None
    sample_num: int = 1
    save_every: int = 1000
    val_dataset: str | None = None
    val_fraction: float = 0.05
    val_batch_size: int = 2
    val_batch_count: int = 40
    val_every: int = 0
    # modern controls
    max_steps: int | None = None
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    precision: str = "auto"
    compile: bool | None = None
    seed: int | None = None
    device: str | None = None
    print_every: int = 1
    keep_checkpoints: int = 5
    checkpoint_dir: str = "checkpoint"
    samples_dir: str = "samples"
    tensorboard: bool = False
    tensorboard_dir: str | None = None
    init: str = "pretrained"
    dropout: float | None = None
    overwrite: bool = False
    skip_memory_check: bool = False
    loss_chunk: int | None = None
    # distributed
    fsdp: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: str = "c_attn"
    dist_timeout: float = 10.0

    @property
    def wants_tensorboard(self) -> bool:
        return self.tensorboard or self.tensorboard_dir is not None

    def validate(self) -> None:
        """Refuse impossible settings before anything is loaded (one line, naming the flag)."""
        def need(ok: bool, flag: str, what: str, value) -> None:
            if not ok:
                raise UserError(f"--{flag} must be {what}, got {value!r}")

        if not self.dataset:
            raise UserError("--dataset is required (on the command line or in --config)")
        for flag in ("batch_size", "accumulate_gradients", "val_batch_size", "val_batch_count",
                     "sample_num", "print_every", "keep_checkpoints"):
            need(getattr(self, flag) >= 1, flag, ">= 1", getattr(self, flag))
        for flag in ("combine", "sample_every", "save_every", "val_every", "warmup_steps",
                     "top_k"):
            need(getattr(self, flag) >= 0, flag, ">= 0", getattr(self, flag))
        for flag in ("learning_rate", "weight_decay", "grad_clip"):
            value = getattr(self, flag)
            need(math.isfinite(value) and value >= 0, flag, "a number >= 0", value)
        need(self.max_steps is None or self.max_steps >= 0, "max_steps", ">= 0", self.max_steps)
        need(self.dist_timeout > 0, "dist_timeout", "> 0 (minutes)", self.dist_timeout)
        need(0.0 <= self.noise < 1.0, "noise", "in [0, 1)", self.noise)
        need(0.0 <= self.top_p <= 1.0, "top_p", "in [0, 1]", self.top_p)
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)", self.val_fraction)
        need(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)",
             self.dropout)
        need(self.sample_length is None or self.sample_length >= 1, "sample_length", ">= 1",
             self.sample_length)
        need(self.optimizer in optim.OPTIMIZERS, "optimizer",
             f"one of {', '.join(optim.OPTIMIZERS)}", self.optimizer)
        need(self.lr_schedule in optim.SCHEDULES, "lr_schedule",
             f"one of {', '.join(optim.SCHEDULES)}", self.lr_schedule)
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}",
             self.precision)
        need(self.init in ("pretrained", "fresh"), "init", "pretrained or fresh", self.init)
        need(self.lora_rank >= 0, "lora_rank", ">= 0", self.lora_rank)
        need(self.loss_chunk is None or self.loss_chunk >= 0, "loss_chunk", ">= 0",
             self.loss_chunk)
        if self.lora_rank:
            for flag, on in (("fsdp", self.fsdp), ("init fresh", self.init == "fresh"),
                             ("only_train_transformer_layers",
                              self.only_train_transformer_layers)):
                if on:
                    raise UserError(f"--lora_rank cannot be combined with --{flag}")
        if self.wants_tensorboard:
            tblog.require()
        if self.lr_schedule == "cosine" and not self.max_steps:
            raise UserError("--lr_schedule cosine needs --max_steps (the length of the decay)")
        if not self.run_name or os.sep in self.run_name or self.run_name in (".", ".."):
            raise UserError(f"--run_name must be a plain folder name, got {self.run_name!r}")


# --- device, precision, compile: the wrappers a distributed version will extend ---------------

def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32 (CPU autocast is slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_loss_chunk(loss_chunk: int | None, config: GPTConfig, device: torch.device) -> int:
    """None (auto) -> 256-row chunks for a GPT-2-sized vocabulary on the CPU, else 0 (plain).

    Measured on CPU (bench/RESULTS.md): +6-9% per 124M step and no [B, T, V] logits; with a
    vocabulary of a few thousand ids the logits are small and chunking costs 4-9%. On CUDA it
    stays off until measured there (fused cross-entropy under torch.compile is the peer).
    """
    if loss_chunk is not None:
        return loss_chunk
    return 256 if device.type == "cpu" and config.n_vocab >= 16384 else 0


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    return torch.compile(model) if enabled else model


def no_sync(model: torch.nn.Module, last_micro_step: bool):
    """DDP syncs gradients on every backward; during accumulation only the last one needs to."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
        model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()
    if not last_micro_step and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def wrap_distributed(model: GPT, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """DDP (a full replica per rank) or, with ``fsdp``, FSDP2 sharding per block then the root.

    DDP broadcasts rank 0's weights when it wraps; FSDP2 does not, so every rank must already
    hold the same weights (the same file, or the same seed for a fresh model).
    """
    if not info.enabled or info.launcher == "horovod":
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def freeze_non_transformer(model: GPT) -> None:
    """--only_train_transformer_layers: only h.* trains; wte (also the tied head), wpe, ln_f stay."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("h."))


def set_dropout(model: GPT, p: float) -> None:
    """Apply --dropout to a loaded model (released models are built with none)."""
    model.config = dataclasses.replace(model.config, dropout=p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


class StopRequest:
    """Ctrl-C / SIGTERM once: finish the current step, save, exit 0. Ctrl-C twice: abort now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: saving after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- the run -----------------------------------------------------------------------------------

@dataclass
class Source:
    """Where the weights come from and whether the trainer state comes with them."""

    model_dir: Path        # hparams.json + encoder files (+ weights unless fresh_init)
    resume: bool           # a trainer checkpoint: restore optimizer, step, RNGs
    fresh_init: bool       # random initialisation from hparams.json


def _checkpoint_arg_dir(value: str) -> Path:
    """--restore_from PATH: a directory, or a file inside one (model.safetensors, model.ckpt)."""
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        return path
    if path.is_file() or (path.parent.is_dir() and any(path.parent.glob(path.name + ".*"))):
        return path.parent
    raise UserError(f"--restore_from {value}: no such checkpoint directory or file "
                    "(use latest, fresh, or a path)")


def _has_weights(model_dir: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "checkpoint")
    return any((model_dir / n).exists() for n in names) or any(model_dir.glob("*.index"))


def resolve_source(cfg: TrainConfig, run_dir: Path) -> Source:
    from .checkpoint import resolve_model_dir

    def base() -> Source:
        model_dir = resolve_model_dir(cfg.model_name, cfg.models_dir, cfg.model_dir)
        if cfg.init == "pretrained" and not _has_weights(model_dir) \
                and (model_dir / "hparams.json").is_file():
            raise UserError(f"{model_dir} holds hparams.json but no weights; add --init fresh "
                            "to train a new model from it")
        return Source(model_dir, resume=False, fresh_init=cfg.init == "fresh")

    if cfg.restore_from == "latest":
        ckpt = ts.find_latest(run_dir)
        return Source(ckpt, True, False) if ckpt is not None else base()
    if cfg.restore_from == "fresh":
        if ts.list_checkpoints(run_dir) and not cfg.overwrite:
            raise UserError(f"{run_dir} already holds checkpoints; --restore_from fresh would "
                            "replace them: add --overwrite, or pick another --run_name")
        return base()
    path = _checkpoint_arg_dir(cfg.restore_from)
    return Source(path, resume=ts.is_checkpoint(path), fresh_init=False)


def _load_chunks(path: str, encoder, cfg: TrainConfig) -> list[np.ndarray]:
    from .dataset import load_dataset

    return load_dataset(path, encoder, combine=cfg.combine, encoding=cfg.encoding)


def _check_vocab(chunks: list[np.ndarray], n_vocab: int, path: str) -> None:
    top = max((int(c.max()) for c in chunks if len(c)), default=-1)
    if top >= n_vocab:
        raise UserError(f"dataset {path} holds token id {top} but the model has only {n_vocab} "
                        "tokens; was it encoded with another model's encoder?")


def _fmt_tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


class Trainer:
    """One training run. ``Trainer(cfg).run()`` returns the exit code (0 = done or stopped)."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = dist_info
        self.rank, self.world_size = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
        self.is_main = self.rank == 0
        self.fsdp = cfg.fsdp and self.world_size > 1
        self.run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
        self.samples_dir = Path(cfg.samples_dir) / cfg.run_name
        self.tb: tblog.TensorBoardLog | None = None

    def log(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from .checkpoint import load_config, load_model
        from .encoder import load_encoder

        cfg = self.cfg
        if self.dist is None:
            self.dist = DistInfo(device=pick_device(cfg.device))
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16")
        source = resolve_source(cfg, self.run_dir)
        self.source = source
        config = load_config(source.model_dir)
        if cfg.dropout is not None:
            config = dataclasses.replace(config, dropout=cfg.dropout)
        self.config = config
        self.seq_len = config.n_ctx
        self.sample_length = cfg.sample_length or config.n_ctx - 1
        if self.sample_length > config.n_ctx:
            raise UserError(f"--sample_length {self.sample_length} is longer than the model's "
                            f"n_ctx ({config.n_ctx})")
        self.loss_chunk = resolve_loss_chunk(cfg.loss_chunk, config, self.device)
        self.ckpt_blocks = []
        if cfg.memory_saving_gradients:
            try:
                self.ckpt_blocks = memory.parse_blocks(cfg.memory_saving_blocks, config.n_layer)
            except ValueError as e:
                raise UserError(f"--memory_saving_blocks: {e}") from None
        self.check_memory()

        # Saved state comes first: it fixes the seed every RNG below derives from.
        state = ts.read_state(source.model_dir) if source.resume else None
        opt_saved = ts.read_optimizer(source.model_dir) if source.resume else None
        self.seed = state["seed"] if state else (
            cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31))
        # One seed for all ranks: a fresh model must start identical everywhere (FSDP does not
        # broadcast), and each rank's data stream is then told apart by its rank alone.
        self.seed = distributed.broadcast_object(self.seed, self.dist)

        if source.fresh_init:
            self.log(f"Initializing a new model from {source.model_dir / 'hparams.json'}")
            torch.manual_seed(self.seed)
            model = GPT(config)
        else:
            self.log(f"Loading checkpoint {source.model_dir}")
            model = load_model(source.model_dir, device="cpu")
            if cfg.dropout is not None:
                set_dropout(model, cfg.dropout)
        self.lora_base = None
        if cfg.lora_rank:
            model = self.attach_lora(model, source)
        self.encoder = load_encoder(source.model_dir)
        self.encoder_dir = source.model_dir
        self.eot = self.encoder.eot_token

        self.load_data()

        model.to(self.device)
        model.train()
        if cfg.only_train_transformer_layers:
            freeze_non_transformer(model)
        if self.ckpt_blocks:
            memory.apply_activation_checkpointing(model, self.ckpt_blocks)
        # The module as built: its names are what gpt2.load_model expects. Under DDP it is the
        # replica inside the wrapper; under FSDP its parameters become shards (DTensors).
        self.model = model
        self.wrapped = wrap_distributed(model, self.dist, self.fsdp)
        self.optimizer = optim.build_optimizer(model, cfg.optimizer, cfg.learning_rate,
                                               cfg.weight_decay)
        if self.dist.launcher == "horovod":  # averaging happens in the optimizer instead of DDP
            self.optimizer = distributed.horovod_optimizer(self.optimizer, model,
                                                           cfg.accumulate_gradients)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        from .dataset import Sampler

        self.sampler = Sampler(self.train_chunks, seed=self.seed, rank=self.rank,
                               world_size=self.world_size, name=f"dataset {self.train_path}")
        # Rank 0 keeps the one-process stream, so one process and rank 0 of many agree.
        self.noise_rng = np.random.default_rng([self.seed, 1] if self.rank == 0
                                               else [self.seed, 1, self.rank])
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.avg = [0.0, 0.0]
        if state is not None:
            self.restore(state, opt_saved)
        else:
            # Same seed, same run: dropout and anything else drawing from the global RNGs.
            torch.manual_seed(self.seed + self.rank)  # dropout masks differ between ranks
            np.random.seed((self.seed + self.rank) % 2**32)
            random.seed(self.seed + self.rank)
        compile_on = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        self.train_model = maybe_compile(self.wrapped, compile_on)
        n_params = model.num_params()
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"Model: {n_params:,} parameters ({n_train:,} trainable); {self.device}, "
                 f"{self.precision}, {cfg.optimizer}, batch {cfg.batch_size} x "
                 f"{cfg.accumulate_gradients} x {self.seq_len} tokens"
                 + (", compiled" if compile_on else "")
                 + (f", checkpointing {len(self.ckpt_blocks)} blocks" if self.ckpt_blocks else ""))
        if self.dist.enabled:
            self.log_effective_batch()
        elif cfg.fsdp:
            self.log("note: --fsdp has no effect in a one-process run (nothing to shard across)")

    def log_effective_batch(self) -> None:
        cfg = self.cfg
        windows = cfg.batch_size * self.world_size * cfg.accumulate_gradients
        self.log(f"Distributed: {self.world_size} processes ({self.dist.launcher}, "
                 f"{'FSDP' if self.fsdp else 'DDP'}, {'nccl' if self.device.type == 'cuda' else 'gloo'}); "
                 f"effective batch {cfg.batch_size} x {self.world_size} ranks x "
                 f"{cfg.accumulate_gradients} accumulation = {windows} windows = "
                 f"{windows * self.seq_len:,} tokens per update")
        self.log(f"note: --learning_rate {cfg.learning_rate:g} applies to the gradient averaged over "
                 f"the whole effective batch; it is not scaled with the number of processes. "
                 f"Scale it by hand if you want (e.g. x{self.world_size} linear or "
                 f"x{math.sqrt(self.world_size):.2f} square-root rule).")

    def attach_lora(self, model: GPT, source) -> GPT:
        """--lora_rank: train adapters only. A LoRA checkpoint holds merged weights (a plain model
        directory) plus adapter/; resuming puts that adapter back on the original base, so the
        run continues exactly where it stopped."""
        from .checkpoint import load_model
        from .lora import apply_lora, count_trainable, load_lora, parse_targets, read_lora_config

        cfg = self.cfg
        adapter = source.model_dir / "adapter"
        if source.resume and (adapter / "lora.json").is_file():
            self.lora_base = read_lora_config(adapter).get("base_model")
            if not self.lora_base:
                raise UserError(f"{adapter / 'lora.json'}: no base_model to resume from")
            self.log(f"Loading LoRA base {self.lora_base} and adapter {adapter}")
            model = load_lora(load_model(self.lora_base, device="cpu"), adapter)
            if cfg.dropout is not None:
                set_dropout(model, cfg.dropout)
        else:
            self.lora_base = str(source.model_dir.resolve())
            try:
                targets = parse_targets(cfg.lora_targets)
                with torch.random.fork_rng(devices=[]):  # the run's seed fixes the adapters' init
                    torch.manual_seed(self.seed)
                    apply_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, targets)
            except ValueError as e:
                raise UserError(f"--lora_targets: {e}") from None
        trainable, total = count_trainable(model)
        self.log(f"LoRA rank {cfg.lora_rank}: training {trainable:,} of {total:,} parameters")
        return model

    def check_memory(self) -> None:
        cfg = self.cfg
        summary = memory.check_fits(self.config, cfg.batch_size, self.precision, cfg.optimizer,
                                    self.device, cfg.only_train_transformer_layers,
                                    len(self.ckpt_blocks), self.seq_len, cfg.skip_memory_check,
                                    fsdp_world_size=self.world_size if self.fsdp else 1,
                                    chunked_loss=self.loss_chunk > 0)
        self.log(f"Memory estimate ({self.device.type}, {self.precision}, batch {cfg.batch_size} "
                 f"x {self.seq_len}): {summary}")

    def load_data(self) -> None:
        from .dataset import find_corpus_splits, split_validation, validation_batches

        cfg = self.cfg
        self.log("Loading dataset...")
        train_path, val_path = cfg.dataset, cfg.val_dataset
        splits = find_corpus_splits(cfg.dataset) if os.path.isdir(cfg.dataset) else None
        if splits:
            train_path = str(splits["train"])
            if val_path is None and splits.get("valid") is not None:
                val_path = str(splits["valid"])
        # Rank 0 encodes into the shared cache first; the others then read it (no race, one bar)
        if not self.is_main:
            distributed.barrier(self.dist)
        chunks = _load_chunks(train_path, self.encoder, cfg)  # prints "dataset has N tokens"
        if self.is_main:
            distributed.barrier(self.dist)
        _check_vocab(chunks, self.config.n_vocab, train_path)
        longest = max(len(c) for c in chunks)
        if longest < self.seq_len:
            # Caught here rather than at the first draw, so the message names the cause.
            raise UserError(f"dataset {train_path} has no document of at least {self.seq_len} "
                            f"tokens (the model's n_ctx; the longest has {longest}); use more "
                            "or longer text, or a larger --combine")
        val_chunks = None
        if cfg.val_every:
            if val_path is not None:
                self.log(f"Loading validation dataset {val_path}...")
                val_chunks = _load_chunks(val_path, self.encoder, cfg)
                _check_vocab(val_chunks, self.config.n_vocab, val_path)
            elif cfg.val_fraction > 0:
                chunks, val_chunks, message = split_validation(chunks, cfg.val_fraction)
                self.log(message)
            else:
                val_chunks = chunks
                self.log("validation uses the training data (set --val_dataset or "
                         "--val_fraction to hold some out)")
        self.train_chunks, self.train_path = chunks, train_path
        self.val_batches = []
        if val_chunks is not None:
            self.val_batches = validation_batches(
                val_chunks, cfg.val_batch_count, cfg.val_batch_size, self.seq_len, seed=1,
                name=f"validation data {val_path or train_path}")

    def restore(self, state: dict, opt_saved) -> None:
        self.step = state["step"]
        self.tokens = state.get("tokens", 0)
        self.elapsed = state.get("elapsed", 0.0)
        self.avg = list(state.get("avg", [0.0, 0.0]))
        if opt_saved is not None:
            problem = self.load_optimizer(*opt_saved)
            if problem:
                self.log(f"warning: not restoring the optimizer state: {problem}")
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        # Each rank's own RNGs when the run is resumed on as many ranks as it was saved from;
        # otherwise rank 0's, and the other ranks keep the streams they were seeded with.
        ranks = state.get("ranks") or [{k: state[k] for k in ("noise_rng", "rng") if k in state}]
        if len(ranks) != self.world_size:
            self.log(f"note: the checkpoint was saved by {len(ranks)} process(es), this run has "
                     f"{self.world_size}: weights, optimizer, step and data position resume, "
                     "per-rank random streams restart")
        own = ranks[self.rank] if self.rank < len(ranks) and len(ranks) == self.world_size \
            else (ranks[0] if self.rank == 0 else {})
        if "noise_rng" in own:
            self.noise_rng.bit_generator.state = own["noise_rng"]
        if "rng" in own:
            ts.set_rng_state(own["rng"])
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            self.log(f"checkpoint {self.source.model_dir} is at step {self.step}; "
                     f"--max_steps {self.cfg.max_steps} is already reached")

    # -- one step ------------------------------------------------------------------------------

    def add_noise(self, tokens: np.ndarray) -> np.ndarray:
        """--noise p: each input token becomes a uniform random id with probability p."""
        if not self.cfg.noise:
            return tokens
        mask = self.noise_rng.random(tokens.shape) < self.cfg.noise
        random_ids = self.noise_rng.integers(0, self.config.n_vocab, tokens.shape)
        return np.where(mask, random_ids, tokens)

    def train_step(self) -> float | None:
        """One update from accumulate_gradients micro-batches; None if the loss was not finite."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        n = cfg.accumulate_gradients
        for i in range(n):
            batch = self.sampler.sample_batch(cfg.batch_size, self.seq_len)
            targets = torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(self.device)
            inputs = torch.from_numpy(self.add_noise(np.asarray(batch, dtype=np.int64)))
            inputs = inputs.to(self.device)
            with no_sync(self.train_model, i == n - 1), autocast(self.device, self.precision):
                loss = self.train_model(inputs, targets=targets, loss_chunk=self.loss_chunk)
            # Averaged over micro-batches (the original summed them: N x the step size).
            self.scaler.scale(loss / n).backward()
            losses.append(loss.detach())
        # The logged loss is the mean over ranks; a NaN on any rank makes every rank skip.
        loss = distributed.all_reduce_mean(torch.stack(losses).mean().item(), self.dist)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            # After DDP's all-reduce every rank clips the same averaged gradient (FSDP: the norm
            # of the full gradient is computed across shards).
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    # -- periodic work -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the fixed validation batches; each rank takes every world_size-th."""
        self.log("Calculating validation loss...")
        n, ws = len(self.val_batches), self.world_size
        # FSDP's forward is a collective, so every rank runs as many batches (the padding ones
        # count zero); DDP ranks use the plain module and need no such care.
        mine = list(range(self.rank, -(-n // ws) * ws if self.fsdp else n, ws))
        model = self.train_model if self.fsdp else self.model
        model.eval()
        total = count = 0.0
        for i in tqdm(mine, disable=not self.is_main):
            tokens = torch.from_numpy(np.asarray(self.val_batches[min(i, n - 1)],
                                                 dtype=np.int64)).to(self.device)
            with autocast(self.device, self.precision):
                loss = model(tokens, targets=tokens, loss_chunk=self.loss_chunk).item()
            if i < n:
                total, count = total + loss, count + 1
        model.train()
        # mean(sum) / mean(count) over ranks = sum / count over all batches
        return distributed.all_reduce_mean(total, self.dist) / \
            distributed.all_reduce_mean(count, self.dist)

    def generate_samples(self) -> None:
        from .sample import sample_sequence

        cfg = self.cfg
        self.log("Generating samples...")
        top_k, top_p = (0, cfg.top_p) if cfg.top_p > 0 else (cfg.top_k, 1.0)
        texts = []
        while len(texts) < cfg.sample_num:
            n = min(cfg.batch_size, cfg.sample_num - len(texts))
            # The original seeded each sample with one random data token; <|endoftext|> is what
            # a document start looks like, and it keeps the data sampler's RNG untouched.
            context = torch.full((n, 1), self.eot, dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                # Under FSDP every rank must run the (sharded) forward; same seed, same text.
                out = sample_sequence(self.train_model if self.fsdp else self.model,
                                      self.sample_length, context, temperature=1.0,
                                      top_k=top_k, top_p=top_p,
                                      seed=self.seed * 1_000_003 + self.step * 1009 + len(texts))
            texts += [self.encoder.decode(row[1:].tolist()) for row in out]
        if not self.is_main:
            return
        formatted = [f"======== SAMPLE {i + 1} ========\n{text}\n" for i, text in enumerate(texts)]
        if self.tb:
            self.tb.samples(self.step, texts)
        for block in formatted:
            self.log(block)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        ts.write_text_atomic(self.samples_dir / f"samples-{self.step}", "\n".join(formatted),
                             encoding=cfg.encoding, errors="replace")

    def trainer_state(self) -> dict:
        cfg = dataclasses.asdict(self.cfg)
        return {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed_now(),
            "avg": self.avg, "seed": self.seed, "sampler": self.sampler.state_dict(),
            "noise_rng": self.noise_rng.bit_generator.state, "rng": ts.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "config": cfg,
        }

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The optimizer state by parameter name; under FSDP gathered whole (a collective)."""
        if not self.fsdp:
            return optim.optimizer_state(self.optimizer, self.model)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=_full_state_options())
        tensors, extra = {}, {}
        for name, slots in osd.get("state", {}).items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
                elif value is not None:
                    extra[f"{name}/{key}"] = value
        names = [n for g in osd.get("param_groups", []) for n in g["params"]]
        return tensors, {"class": type(self.optimizer).__name__, "params": names, "extra": extra}

    def load_optimizer(self, tensors: dict[str, torch.Tensor], meta: dict) -> str | None:
        if not self.fsdp:
            return optim.load_optimizer_state(self.optimizer, self.model, tensors, meta)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, \
            set_optimizer_state_dict

        # Every rank read the whole file; each keeps its own shard of it.
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if meta.get("class") != type(self.optimizer).__name__ or meta.get("params") != names:
            return "it was saved for another optimizer or another set of trainable parameters"
        state: dict[str, dict] = {}
        for key, value in list(tensors.items()) + list(meta.get("extra", {}).items()):
            name, _, slot = key.rpartition("/")
            state.setdefault(name, {})[slot] = value
        it = iter(names)
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [next(it) for _ in g["params"]]} for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        return None

    def full_model(self) -> torch.nn.Module:
        """The model to write: itself, or under FSDP a CPU copy of the gathered weights."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=_full_state_options())
        if not self.is_main:
            return self.model
        with torch.device("meta"):  # no second random initialisation of a large model
            full = GPT(self.config)
        full.load_state_dict(sd, strict=False, assign=True)
        full.lm_head.weight = full.wte.weight  # assign=True untied them
        missing = [n for n, p in full.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"FSDP gather did not return {missing[:3]}")
        return full

    def save(self) -> None:
        """Collective: gathers what every rank holds, rank 0 writes, the others wait for it."""
        path = self.run_dir / f"model-{self.step}"
        self.log(f"Saving {path}")
        model = self.full_model()
        extra = None
        if self.lora_base is not None:
            from .lora import merged_model, save_lora

            model = merged_model(self.model)  # the checkpoint stays a plain model directory

            def extra(tmp: Path) -> None:
                save_lora(self.model, tmp / "adapter", base_model=self.lora_base)
        tensors, meta = self.optimizer_state()
        ranks = distributed.all_gather_object(
            {"noise_rng": self.noise_rng.bit_generator.state, "rng": ts.rng_state()}, self.dist)
        if self.is_main:
            state = self.trainer_state()
            state["ranks"] = ranks
            state["world_size"] = self.world_size
            if state["scaler"] is None:
                del state["scaler"]
            remove_others = self.cfg.restore_from == "fresh" and self.cfg.overwrite \
                and not self._fresh_cleaned
            saved = ts.save_checkpoint(self.run_dir, self.step, model, tensors, meta, state,
                                       encoder_dir=self.encoder_dir,
                                       keep=self.cfg.keep_checkpoints,
                                       remove_others=remove_others, extra=extra)
            # Later saves copy the encoder from the newest checkpoint, which pruning never
            # removes; the directory the run started from may be pruned (a resumed run's).
            self.encoder_dir = saved
        # No rank races ahead (or exits) before the checkpoint is on disk.
        distributed.barrier(self.dist)
        self._fresh_cleaned = True
        self.last_saved = self.step

    def elapsed_now(self) -> float:
        return self.elapsed + (time.time() - self.t_start)

    def write_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / ts.METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb:
                self.tb.write(record)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ts.truncate_metrics(self.run_dir, self.step)
            if cfg.wants_tensorboard:
                self.tb = tblog.TensorBoardLog(
                    Path(cfg.tensorboard_dir or self.run_dir / "tensorboard"), self.step)
        try:
            return self._loop()
        finally:
            if self.tb:
                self.tb.close()

    def _loop(self) -> int:
        cfg = self.cfg
        self._fresh_cleaned = False
        self.last_saved = self.step if self.source.resume else None
        tokens_per_step = cfg.batch_size * cfg.accumulate_gradients * self.seq_len * self.world_size
        nonfinite = 0
        self.t_start = time.time()
        self.log("Training...")
        with StopRequest() as stop:
            if self.val_batches and self.step == 0:
                # The starting point, as the original validated before its first update.
                val = self.validate()
                self.log(f"[0 | {self.elapsed_now():2.2f}] validation loss = {val:2.2f}")
                self.write_metrics({"step": 0, "tokens": 0, "elapsed": self.elapsed_now(),
                                    "val_loss": val})
            # A stop seen by any rank stops them all at the same step boundary.
            while not distributed.broadcast_flag(stop.requested, self.dist) and \
                    (cfg.max_steps is None or self.step < cfg.max_steps):
                t0 = time.time()
                optim.set_lr(self.optimizer, lr := optim.lr_at(
                    self.step + 1, cfg.learning_rate, cfg.lr_schedule, cfg.warmup_steps,
                    cfg.max_steps))
                loss = self.train_step()
                if loss is None:
                    nonfinite += 1
                    self.log(f"warning: non-finite loss at step {self.step + 1}; step skipped")
                    if nonfinite >= MAX_NONFINITE:
                        raise UserError(f"the loss was not finite {MAX_NONFINITE} steps in a "
                                        "row; lower --learning_rate or use --precision fp32/bf16")
                    continue
                nonfinite = 0
                self.step += 1
                self.tokens += tokens_per_step
                self.avg = [self.avg[0] * 0.99 + loss, self.avg[1] * 0.99 + 1.0]
                avg = self.avg[0] / self.avg[1]
                if self.step % cfg.print_every == 0:
                    self.log(f"[{self.step} | {self.elapsed_now():2.2f}] loss={loss:2.2f} "
                             f"avg={avg:2.2f}")
                record = {"step": self.step, "loss": loss, "avg": avg, "lr": lr,
                          "tokens_per_sec": tokens_per_step / max(time.time() - t0, 1e-9),
                          "elapsed": self.elapsed_now(), "tokens": self.tokens}
                if cfg.val_every and self.val_batches and self.step % cfg.val_every == 0:
                    record["val_loss"] = self.validate()
                    self.log(f"[{self.step} | {self.elapsed_now():2.2f}] validation loss = "
                             f"{record['val_loss']:2.2f}")
                self.write_metrics(record)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.generate_samples()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            if distributed.broadcast_flag(stop.requested, self.dist):
                self.log("interrupted")
            if self.last_saved != self.step:
                self.save()
        return 0


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection", "peer"))


def train(cfg: TrainConfig, dist_info: DistInfo | None = None) -> int:
    """Run training as ``gpt2 train`` does; returns the exit code.

    Started by a launcher (torchrun, mpirun, srun) it joins the process group first; a rank that
    dies or hangs makes the others fail after --dist_timeout minutes with one line, not a hang.
    """
    cfg.validate()
    own_group = dist_info is None
    info = dist_info or distributed.init(cfg.device, cfg.dist_timeout)
    try:
        code = Trainer(cfg, info).run()
    except UserError:
        raise
    except Exception as e:
        if info.enabled and _is_comm_error(e):
            raise UserError(distributed.lost_contact_message(info, e)) from None
        raise
    finally:
        if own_group:
            distributed.shutdown()
    if own_group and info.enabled:
        # Everything is saved and the group is closed. Gloo's threads can still abort the
        # interpreter's own teardown now and then ("terminate called without an active
        # exception", exit 134), turning a finished run into a failure: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

"""The training loop: fine-tune a GPT-2 or train one from scratch, resumable to the bit.

    from gpt2.train import TrainConfig, train
    train(TrainConfig(dataset="my.txt", model_name="124M", max_steps=1000))

Read top to bottom: :meth:`Trainer.setup` builds everything (:mod:`.build` the model,
:mod:`gpt2.data` the data, :mod:`.parallelize` the wrappers, :mod:`.optim` the optimizer) and
restores a checkpoint's state; :meth:`Trainer.loop` runs updates, logging, validation, samples
and saves; :meth:`Trainer.train_step` is one update.

Distributed runs (``torchrun``, ``mpirun``, ``srun``; see :mod:`.distributed`) start every rank
from the same weights and seed; each rank draws its own windows, and gradients are averaged
once per update. Validation is split across ranks and all-reduced; only rank 0 prints, writes
metrics and samples, and saves, while the others wait at a barrier. A stop request on any rank
is shared at the step boundary, so all ranks stop at the same step.

Resuming (``--restore_from latest``) restores weights, optimizer state, the step count (which
fixes the learning-rate schedule's position), the moving average, the data sampler's position
and every RNG, so a stopped and resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ..data.sampler import Sampler, add_noise
from ..errors import UserError
from ..io.model_dir import load_config
from ..runtime import autocast, backend_of, pick_device, resolve_precision
from ..sampling import sample_sequence
from ..tokenizer.files import load_encoder
from . import distributed, optim
from .build import build_model, lora_checkpoint
from .config import TrainConfig
from .distributed import DistInfo
from .parallelize import parallelize, parse_blocks
from .run_dir import RunDir, RunLock
from .setup import (choose_seed, describe_run, load_training_data, memory_summary,
                    restore_rngs, seed_globals, space_warning)
from .state import read_optimizer, read_state, rng_state
from .tensorboard import TensorBoardLog

MAX_NONFINITE = 10  # consecutive skipped steps before giving up


class StopRequest:
    """Ctrl-C / SIGTERM once: finish the current step, save, exit 0. Ctrl-C twice: abort now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to abort "
              "without saving)", file=sys.stderr, flush=True)

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


class Trainer:
    """One training run. ``Trainer(cfg, dist).run()`` returns the exit code (0 = done/stopped)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = dist or DistInfo(device=pick_device(cfg.device))  # one process
        self.is_main = self.dist.is_main
        self.run_dir = RunDir(cfg.checkpoint_dir, cfg.samples_dir, cfg.run_name)
        self.tb: TensorBoardLog | None = None

    def log(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.source = self.run_dir.source(cfg.restore_from, cfg.overwrite, cfg.init,
                                          cfg.model_name, cfg.models_dir, cfg.model_dir)
        config = load_config(self.source.model_dir)
        if cfg.dropout is not None:
            config = dataclasses.replace(config, dropout=cfg.dropout)
        self.config, self.seq_len = config, config.n_ctx
        self.sample_length = cfg.sample_length or config.n_ctx - 1
        if self.sample_length > config.n_ctx:
            raise UserError(f"--sample_length {self.sample_length} is longer than the model's "
                            f"n_ctx ({config.n_ctx})")
        self.loss_chunk = cfg.loss_chunk
        try:
            blocks = (parse_blocks(cfg.memory_saving_blocks, config.n_layer)
                      if cfg.memory_saving_gradients else [])
        except ValueError as e:
            raise UserError(f"--memory_saving_blocks: {e}") from None
        self.log(memory_summary(cfg, config, self.device, self.precision, len(blocks),
                                self.dist.world_size, self.loss_chunk))
        # Saved state comes first: it fixes the seed every RNG below derives from.
        state = read_state(self.source.model_dir) if self.source.resume else None
        self.seed = choose_seed(cfg.seed, state, self.dist)
        model, self.lora_base = build_model(cfg, self.source, config, self.seed, self.log)
        self.encoder = load_encoder(self.source.model_dir)
        self.encoder_dir = self.source.model_dir
        self.log("Loading dataset...")
        self.data = load_training_data(cfg, self.encoder, config, self.dist, self.log)
        self.compiled = cfg.compile if cfg.compile is not None else \
            backend_of(self.device).compile_by_default
        self.parallel = parallelize(model.to(self.device).train(), self.dist, fsdp=cfg.fsdp,
                                    compile=self.compiled, checkpoint_blocks=blocks)
        self.optimizer = distributed.wrap_optimizer(optim.build_optimizer(
            model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay), model, self.dist,
            cfg.accumulate_gradients)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.sampler = Sampler(self.data.train, seed=self.seed, rank=self.dist.rank,
                               world_size=self.dist.world_size,
                               name=f"dataset {self.data.train_path}")
        # Rank 0 keeps the one-process stream, so one process and rank 0 of many agree.
        self.noise_rng = np.random.default_rng(
            [self.seed, 1] if self.is_main else [self.seed, 1, self.dist.rank])
        self.step, self.tokens, self.elapsed, self.avg = 0, 0, 0.0, [0.0, 0.0]
        if state is not None:
            self.restore(state, read_optimizer(self.source.model_dir))
        else:
            seed_globals(self.seed + self.dist.rank)  # dropout masks differ between ranks
        for line in describe_run(cfg, self.dist, model, self.precision, self.compiled, blocks,
                                 self.parallel.sharded):
            self.log(line)

    def restore(self, state: dict, opt_saved) -> None:
        self.step, self.tokens = state["step"], state.get("tokens", 0)
        self.elapsed, self.avg = state.get("elapsed", 0.0), list(state.get("avg", [0.0, 0.0]))
        if opt_saved is not None:
            problem = optim.load_optimizer_state(self.optimizer, self.parallel.model,
                                                 *opt_saved, sharded=self.parallel.sharded)
            if problem:
                self.log(f"warning: not restoring the optimizer state: {problem}")
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        restore_rngs(state, self.dist, self.noise_rng, self.log)
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            self.log(f"checkpoint {self.source.model_dir} is at step {self.step}; "
                     f"--max_steps {self.cfg.max_steps} is already reached")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        lock = RunLock(self.run_dir.path)
        try:
            if self.is_main:  # rank 0 holds the run directory for every rank
                lock.acquire(self.log)
                if self.run_dir.clean_leftovers():
                    self.log("removed the temporary files of a save that did not finish")
            self.setup()
            if self.is_main:
                self.run_dir.truncate_metrics(self.step)
                warning = space_warning(self.cfg, self.parallel.model, self.run_dir.path)
                if warning:
                    self.log(warning)
                if self.cfg.wants_tensorboard:
                    self.tb = TensorBoardLog(self.cfg.tensorboard_dir
                                             or self.run_dir.path / "tensorboard", self.step)
            return self.loop()
        finally:
            if self.tb:
                self.tb.close()
            lock.release()

    def loop(self) -> int:
        cfg = self.cfg
        self.fresh_cleaned = False
        self.last_saved = self.step if self.source.resume else None
        tokens_per_step = cfg.batch_size * cfg.accumulate_gradients * self.seq_len * \
            self.dist.world_size
        nonfinite = 0
        self.t_start = time.time()
        self.log("Training...")
        with StopRequest() as stop:
            self.stop = stop
            if self.data.val_batches and self.step == 0:
                # The starting point, as the original validated before its first update.
                self.validate_and_log({"step": 0, "tokens": 0})
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
                if cfg.val_every and self.data.val_batches and self.step % cfg.val_every == 0:
                    self.validate_and_log(record)
                else:
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

    def elapsed_now(self) -> float:
        return self.elapsed + (time.time() - self.t_start)

    def write_metrics(self, record: dict) -> None:
        if self.is_main:
            self.run_dir.append_metrics(record, self.tb)

    # -- one step ------------------------------------------------------------------------------

    def train_step(self) -> float | None:
        """One update from accumulate_gradients micro-batches; None if the loss was not finite."""
        cfg, model = self.cfg, self.parallel.train_model
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        n = cfg.accumulate_gradients
        for i in range(n):
            batch = np.asarray(self.sampler.sample_batch(cfg.batch_size, self.seq_len),
                               dtype=np.int64)
            targets = torch.from_numpy(batch).to(self.device)
            inputs = torch.from_numpy(add_noise(batch, cfg.noise, self.noise_rng,
                                                self.config.n_vocab)).to(self.device)
            with self.parallel.synced():
                with self.parallel.no_sync(i == n - 1), autocast(self.device, self.precision):
                    loss = model(inputs, targets=targets, loss_chunk=self.loss_chunk)
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
            torch.nn.utils.clip_grad_norm_(self.parallel.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    # -- periodic work -------------------------------------------------------------------------

    def validate_and_log(self, record: dict) -> None:
        val = self.validate()
        if val is None:
            if record["step"]:
                self.write_metrics(record)
            return
        self.log(f"[{record['step']} | {self.elapsed_now():2.2f}] validation loss = {val:2.2f}")
        if record["step"] == 0:
            record["elapsed"] = self.elapsed_now()
        record["val_loss"] = val
        self.write_metrics(record)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the fixed validation batches, shared out across the ranks; None when
        a stop was requested during the pass."""
        self.log("Calculating validation loss...")
        batches, model = self.data.val_batches, self.parallel.eval_model
        model.eval()
        total = count = 0.0
        for i in tqdm(distributed.my_share(len(batches), self.dist), disable=not self.is_main):
            if distributed.broadcast_flag(self.stop.requested, self.dist):
                model.train()  # Ctrl-C: stop within a batch, not after the whole pass
                return None
            tokens = torch.from_numpy(np.asarray(batches[min(i, len(batches) - 1)],
                                                 dtype=np.int64)).to(self.device)
            with self.parallel.synced(training=False), autocast(self.device, self.precision):
                loss = model(tokens, targets=tokens, loss_chunk=self.loss_chunk).item()
            if i < len(batches):  # padding batches (FSDP) run but count zero
                total, count = total + loss, count + 1
        model.train()
        # mean(sum) / mean(count) over ranks = sum / count over all batches
        return distributed.all_reduce_mean(total, self.dist) / \
            distributed.all_reduce_mean(count, self.dist)

    def generate_samples(self) -> None:
        cfg = self.cfg
        self.log("Generating samples...")
        top_k, top_p = (0, cfg.top_p) if cfg.top_p > 0 else (cfg.top_k, 1.0)
        texts = []
        while len(texts) < cfg.sample_num:
            n = min(cfg.batch_size, cfg.sample_num - len(texts))
            # The original seeded each sample with one random data token; <|endoftext|> is what
            # a document start looks like, and it keeps the data sampler's RNG untouched.
            context = torch.full((n, 1), self.encoder.eot_token, dtype=torch.long,
                                 device=self.device)
            with self.parallel.synced(training=False), autocast(self.device, self.precision):
                # Under FSDP every rank must run the (sharded) forward; same seed, same text.
                out = sample_sequence(self.parallel.eval_model, self.sample_length, context,
                                      temperature=1.0, top_k=top_k, top_p=top_p,
                                      seed=self.seed * 1_000_003 + self.step * 1009 + len(texts))
            texts += [self.encoder.decode(row[1:].tolist()) for row in out]
        if not self.is_main:
            return
        if self.tb:
            self.tb.samples(self.step, texts)
        for block in self.run_dir.write_samples(self.step, texts, cfg.encoding):
            self.log(block)

    def trainer_state(self) -> dict:
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed_now(),
            "avg": self.avg, "seed": self.seed, "sampler": self.sampler.state_dict(),
            "noise_rng": self.noise_rng.bit_generator.state, "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self) -> None:
        """Collective: gathers what every rank holds, rank 0 writes, the others wait for it."""
        path = self.run_dir.path / f"model-{self.step}"
        self.log(f"Saving {path}")
        model, extra = self.parallel.full_model(), None
        if self.lora_base is not None:
            model, extra = lora_checkpoint(self.parallel.model, self.lora_base)
        tensors, meta = optim.optimizer_state(self.optimizer, self.parallel.model,
                                              gather=self.parallel.sharded)
        ranks = distributed.all_gather_object(
            {"noise_rng": self.noise_rng.bit_generator.state, "rng": rng_state()}, self.dist)
        if self.is_main:
            state = {**self.trainer_state(), "ranks": ranks, "world_size": self.dist.world_size}
            remove_others = self.cfg.restore_from == "fresh" and self.cfg.overwrite \
                and not self.fresh_cleaned
            # Later saves copy the encoder from the newest checkpoint, which pruning never
            # removes; the directory the run started from may be pruned (a resumed run's).
            self.encoder_dir = self.run_dir.save(
                self.step, model, tensors, meta, state, encoder_dir=self.encoder_dir,
                keep=self.cfg.keep_checkpoints, remove_others=remove_others, extra=extra)
        # No rank races ahead (or exits) before the checkpoint is on disk.
        distributed.barrier(self.dist)
        self.fresh_cleaned = True
        self.last_saved = self.step


def train(cfg: TrainConfig, dist_info: DistInfo | None = None) -> int:
    """Run training as ``gpt2 train`` does; returns the exit code.

    Started by a launcher (torchrun, mpirun, srun) it joins the process group first; a rank that
    dies or hangs makes the others fail after --dist_timeout minutes with one line, not a hang.
    """
    cfg.validate()
    with distributed.process_group(cfg.device, cfg.dist_timeout, dist_info) as dist:
        return Trainer(cfg, dist).run()

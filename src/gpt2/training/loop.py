"""The training loop: fine-tune a GPT-2 or train one from scratch, resumable to the bit.

    from gpt2.training import TrainConfig, train
    train(TrainConfig(dataset="my.txt", model_name="124M", max_steps=1000))

:meth:`Trainer.setup` builds the run from parts, each built (and tested) on its own:
:func:`~.start.plan_start` (where from: weights, config, saved state, seed),
:func:`~.build.build_training_model` (the model, wrapped for the run),
:class:`~.batches.TextBatches` (the data), :class:`~.optim.Optimization` (optimizer, schedule,
scaler) and :class:`~.evaluation.Validation`; a checkpoint's state is then restored into each.
:meth:`Trainer.loop` runs updates, logging, validation, samples and saves;
:meth:`Trainer.train_step` is one update.

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
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..runtime import autocast, is_out_of_memory, pick_device
from ..tokenizer.chat import TEMPLATE_FILE, ChatTemplate
from ..tokenizer.files import load_encoder
from . import distributed, optim
from .build import build_training_model, lora_checkpoint, out_of_memory_message
from .config import TrainConfig
from .distributed import DistInfo
from .evaluation import TaskEvals, Validation, training_samples
from .objectives import build_objective, load_training_batches
from .run_dir import RunDir, RunLock, space_warning
from .start import Start, plan_start
from .stop import StopRequest  # noqa: F401 (its home was here)
from .state import read_optimizer, restore_rngs, rng_state, seed_globals
from .tensorboard import TensorBoardLog

MAX_NONFINITE = 10  # consecutive skipped steps before giving up
STOP_CHECK_EVERY = 10  # distributed ranks agree on a stop (a collective, a device wait) this often


@dataclass
class Progress:
    """The run's counters, saved in every checkpoint (trainer_state.json)."""

    step: int = 0                 # updates done, counted across resumes
    tokens: int = 0               # training tokens seen, all ranks
    elapsed: float = 0.0          # seconds of training before this process's start
    avg: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the loss's moving average
    started: float = field(default_factory=time.time)

    @classmethod
    def of(cls, state: dict | None) -> Progress:
        if state is None:
            return cls()
        return cls(state["step"], state.get("tokens", 0), state.get("elapsed", 0.0),
                   list(state.get("avg", [0.0, 0.0])))

    def now(self) -> float:
        """Seconds of training, this process's included."""
        return self.elapsed + (time.time() - self.started)

    def count(self, loss: float, tokens: int) -> float:
        """An update's loss (its step already counted): the moving average after it."""
        self.tokens += tokens
        self.avg = [self.avg[0] * 0.99 + loss, self.avg[1] * 0.99 + 1.0]
        return self.avg[0] / self.avg[1]

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.now(), "avg": self.avg}


class Unsettled:
    """Steps whose loss is still a tensor on the device, read all at once when the loop next
    needs numbers (a line to print, validation, samples, a save, a stop, the end): reading a
    number waits for the device, and a GPU that waits after every step idles while the next
    one is launched (nanoGPT reads only when it logs). A step whose loss was not finite did
    not change the weights (:meth:`~.optim.Optimization.finish_update`); it is reported here,
    and ten in a row stop the run."""

    def __init__(self, progress: Progress, tokens_per_update: int, print_every: int,
                 log: Callable[[str], None]):
        self.progress, self.tokens, self.print_every, self.log = \
            progress, tokens_per_update, print_every, log
        self.steps: list[tuple[int, torch.Tensor, float, float, float]] = []
        self.names: list[str] = []  # the objective's metrics, after the loss in each tensor
        self.nonfinite = 0

    def add(self, loss: torch.Tensor, lr: float, started: float,
            metrics: dict[str, torch.Tensor] | None = None) -> None:
        """The step just taken (``progress.step``), ``loss`` a 0-d tensor on the device, and
        the objective's metrics (0-d tensors too)."""
        metrics = metrics or {}
        self.names = list(metrics)
        values = torch.stack([loss.detach().float(), *(v.float() for v in metrics.values())])
        self.steps.append((self.progress.step, values, lr, started, time.time()))

    def settle(self) -> list[dict]:
        """The metrics records of the steps since the last call whose loss was finite."""
        if not self.steps:
            return []
        values = torch.stack([v for _, v, *_ in self.steps]).tolist()  # one wait
        # The device finished the last step only now: its end, and the pace, count from here.
        self.steps[-1] = (*self.steps[-1][:4], time.time())
        first, last = self.steps[0][3], self.steps[-1][4]
        pace = self.tokens * len(self.steps) / max(last - first, 1e-9)
        records = []
        for (step, _, lr, started, ended), (loss, *metrics) in zip(self.steps, values):
            if not math.isfinite(loss):
                self.nonfinite += 1
                self.log(f"warning: non-finite loss at step {step}; its update was skipped")
                if self.nonfinite >= MAX_NONFINITE:
                    raise UserError(f"the loss was not finite {MAX_NONFINITE} steps in a row; "
                                    "lower --learning_rate or use --precision fp32/bf16")
                continue
            self.nonfinite = 0
            avg = self.progress.count(loss, self.tokens)
            elapsed = self.progress.elapsed + (ended - self.progress.started)
            if step % self.print_every == 0:
                self.log(f"[{step} | {elapsed:2.2f}] loss={loss:2.2f} avg={avg:2.2f}")
            records.append({"step": step, "loss": loss, "avg": avg, "lr": lr,
                            "tokens_per_sec": self.tokens / max(ended - started, 1e-9)
                            if len(self.steps) == 1 else pace,
                            "elapsed": elapsed, "tokens": self.progress.tokens,
                            **dict(zip(self.names, metrics))})
        self.steps = []
        return records


class Trainer:
    """One training run. ``Trainer(cfg, dist).run()`` returns the exit code (0 = done/stopped)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo | None = None):
        self.cfg = cfg  # checked by train() (TrainConfig.validate)
        self.dist = dist or DistInfo(device=pick_device(cfg.device))  # one process
        self.is_main = self.dist.is_main
        self.run_dir = RunDir(cfg.checkpoint_dir, cfg.samples_dir, cfg.run_name)
        self.tb: TensorBoardLog | None = None
        self.start: Start | None = None      # set first thing by setup()
        self.last_saved: int | None = None   # the step of this run's newest checkpoint
        self.replaced_old_run = False        # --restore_from fresh --overwrite: done once

    def log(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        # Where the run starts: the weights, their config, a checkpoint's state, the seed.
        self.start = start = plan_start(cfg, self.run_dir, dist)
        # The model: memory checked first, then loaded or initialised, wrapped for the run.
        self.model = build_training_model(cfg, start, dist, self.log)
        # The tokenizer (later saves copy it from the newest checkpoint), the chat template,
        # and the data: windows of text, or examples.
        self.encoder, self.encoder_dir = load_encoder(start.point.model_dir), start.point.model_dir
        self.template = ChatTemplate.for_model(start.point.model_dir, cfg.chat_template,
                                               check=False)  # (compiled if chats need it)
        self.batches = load_training_batches(cfg, self.encoder, self.template, start, dist,
                                             self.log)
        if cfg.epochs is not None:  # the run's length in updates, the same on every rank
            steps = cfg.epochs * self.batches.steps_per_epoch(cfg.accumulate_gradients)
            self.log(f"{cfg.epochs} epoch(s) of {len(self.batches.examples):,} examples: "
                     f"{steps:,} updates")
            self.cfg = cfg = dataclasses.replace(cfg, max_steps=steps)
        # What a batch's loss is (a preference objective sets up its reference here).
        self.objective = build_objective(cfg, self.model, self.batches, start, dist, self.log,
                                         self.encoder, self.template)
        self.validation = Validation(self.batches.val_batches, self.model, self.objective, dist,
                                     self.log)
        self.evals = TaskEvals(cfg, self.model, self.encoder, dist, self.log)
        # The optimizer around the model as built (sharded in place under FSDP).
        self.opt = optim.Optimization(cfg, self.model.parallel.model, dist, self.model.precision)
        # A checkpoint's state goes back into every part; a new run seeds dropout per rank.
        self.progress = Progress.of(start.state)
        if start.resume:
            self.restore(start.state)
            self.last_saved = self.progress.step
        else:
            seed_globals(start.seed + dist.rank)
        for line in self.model.describe(cfg, dist):
            self.log(line)

    def restore(self, state: dict) -> None:
        saved = read_optimizer(self.start.point.model_dir)
        if saved is not None:
            problem = optim.load_optimizer_state(self.opt.optimizer, self.model.parallel.model,
                                                 *saved, sharded=self.model.parallel.sharded)
            if problem:
                self.log(f"warning: not restoring the optimizer state: {problem}")
        if "scaler" in state and self.opt.scaler.is_enabled():
            self.opt.scaler.load_state_dict(state["scaler"])
        if "sampler" in state:
            self.batches.load_state_dict(state["sampler"])
        restore_rngs(state, self.dist.rank, self.dist.world_size, self.batches.noise_rng,
                     self.log)
        if self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps:
            self.log(f"checkpoint {self.start.point.model_dir} is at step {self.progress.step}; "
                     f"--max_steps {self.cfg.max_steps} is already reached")

    def run(self) -> int:
        lock = RunLock(self.run_dir.path)
        try:
            if self.is_main:  # rank 0 holds the run directory for every rank
                lock.acquire(self.log)
                if self.run_dir.clean_leftovers():
                    self.log("removed the temporary files of a save that did not finish")
            self.setup()
            self.open_outputs()
            return self.loop()
        except Exception as e:
            if not is_out_of_memory(e) or self.start is None:
                raise
            # (--skip_memory_check, or an estimate that fell short): one line, how much
            raise UserError(out_of_memory_message(e, self.cfg, self.start.config,
                                                  self.dist.device, self.dist.world_size)
                            ) from None
        finally:
            if self.tb:
                self.tb.close()
            lock.release()

    def open_outputs(self) -> None:
        """Rank 0: metrics from a resumed step on are rewritten; the disk's room; TensorBoard."""
        if not self.is_main:
            return
        self.run_dir.truncate_metrics(self.progress.step)
        warning = space_warning(self.model.parallel.model, self.cfg.optimizer, self.run_dir.path)
        if warning:
            self.log(warning)
        if self.cfg.wants_tensorboard:
            self.tb = TensorBoardLog(self.cfg.tensorboard_dir or self.run_dir.path / "tensorboard",
                                     self.progress.step)

    # -- the loop ------------------------------------------------------------------------------

    def loop(self) -> int:
        cfg, progress, dist = self.cfg, self.progress, self.dist
        steps = Unsettled(progress, self.batches.tokens * cfg.accumulate_gradients *
                          dist.world_size, cfg.print_every, self.log)
        progress.started = time.time()
        self.log("Training...")
        with StopRequest() as stop:
            # The starting point, as the original validated before its first update.
            if progress.step == 0 and (self.validation or cfg.eval_every):
                self.measure({"step": 0, "tokens": 0}, stop, bool(self.validation),
                             bool(cfg.eval_every))
            # Until --max_steps, or a stop that any rank saw (all stop at the same step; a
            # single process looks at every step, ranks agree where they settle: at least
            # every STOP_CHECK_EVERY steps).
            while cfg.max_steps is None or progress.step < cfg.max_steps:
                if (not dist.enabled or not steps.steps) and \
                        distributed.broadcast_flag(stop.requested, dist):
                    break
                started = time.time()
                # This update's learning rate, fresh gradients; forward and backward over the
                # micro-batches, then the optimizer step (skipped on the device if not finite).
                lr = self.opt.start_update(progress.step + 1)
                progress.step += 1
                loss, metrics = self.train_step()
                steps.add(loss, lr, started, metrics)
                step = progress.step
                last = step == cfg.max_steps  # (the final model's numbers are compared)
                validate = bool(cfg.val_every and self.validation and (
                    step % cfg.val_every == 0 or last))
                evals = bool(cfg.eval_every and (step % cfg.eval_every == 0 or last))
                sample = bool(cfg.sample_every and step % cfg.sample_every == 0)
                save = bool(cfg.save_every and step % cfg.save_every == 0)
                if not (validate or evals or sample or save or last
                        or (stop.requested and not dist.enabled)
                        or (dist.enabled and step % STOP_CHECK_EVERY == 0)
                        or step % cfg.print_every == 0):
                    continue
                # The losses so far, printed and recorded; validation, samples and
                # checkpoints, each on its own schedule.
                records = steps.settle()
                for record in records[:-1]:
                    self.write_metrics(record)
                if records and records[-1]["step"] == step:
                    self.measure(records[-1], stop, validate, evals)
                else:  # this step's loss was not finite: measured without one
                    if records:
                        self.write_metrics(records[-1])
                    self.measure({"step": step, "tokens": progress.tokens}, stop, validate,
                                 evals)
                if sample:
                    self.write_samples()
                if save:
                    self.save()
            # Stopped or done: the last steps are saved.
            for record in steps.settle():
                self.write_metrics(record)
            if distributed.broadcast_flag(stop.requested, self.dist):
                self.log("interrupted")
            if self.last_saved != progress.step:
                self.save()
        return 0

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One update from accumulate_gradients micro-batches: the loss, a 0-d tensor on the
        device (the mean over ranks; a NaN on any rank makes every rank skip the update), and
        the objective's metrics (means over micro-batches and ranks, on the device too)."""
        n, model = self.cfg.accumulate_gradients, self.model
        values = []
        for i in range(n):
            batch = self.batches.next()
            with model.parallel.synced():
                with model.parallel.no_sync(i == n - 1), \
                        autocast(self.dist.device, model.precision):
                    loss, metrics = self.objective(model.parallel.train_model, batch,
                                                   model.loss_chunk)
                # Averaged over micro-batches (the original summed them: N x the step size).
                self.opt.backward(loss / n)
            values.append(torch.stack([loss.detach().float(),
                                       *(v.float() for v in metrics.values())]))
        mean = distributed.all_reduce_mean_tensor(torch.stack(values).mean(0), self.dist)
        loss = mean[0]
        self.opt.finish_update(~torch.isfinite(loss))
        return loss, dict(zip(metrics, mean[1:]))

    # -- periodic work -------------------------------------------------------------------------

    def write_metrics(self, record: dict) -> None:
        if self.is_main:
            self.run_dir.append_metrics(record, self.tb)

    def measure(self, record: dict, stop: StopRequest, validate: bool, evals: bool) -> None:
        """The validation loss and the benchmarks when due, into ``record``, which is then
        written (without a loss, at step 0 or a skipped update, only if something was
        measured). A stop during either pass
        leaves the rest out."""
        measured = False
        if validate:
            val = self.validation.run(stop)
            if val is not None:
                self.log(f"[{record['step']} | {self.progress.now():2.2f}] validation loss = "
                         f"{val['val_loss']:2.2f}" + "".join(
                             f", {k} = {v:.4f}" for k, v in val.items() if k != "val_loss"))
                record.update(val)
                measured = True
            evals = evals and val is not None
        if evals:
            scores = self.evals.run(stop)
            if scores is not None:
                self.log(f"[{record['step']} | {self.progress.now():2.2f}] " +
                         ", ".join(f"{k} = {v:.4f}" for k, v in scores.items()))
                record.update(scores)
                measured = True
        if "loss" not in record:  # the starting point, or a skipped update
            if not measured:
                return
            record["elapsed"] = self.progress.now()
        self.write_metrics(record)

    def write_samples(self) -> None:
        self.log("Generating samples...")
        step = self.progress.step
        texts = training_samples(self.model, self.encoder, self.cfg, self.start.seed, step,
                                 self.start.sample_length, self.dist,
                                 self.batches.sample_prompts)
        if not self.is_main:
            return
        if self.tb:
            self.tb.samples(step, texts)
        for block in self.run_dir.write_samples(step, texts, self.cfg.encoding):
            self.log(block)

    @property
    def saves_template(self) -> bool:
        """Checkpoints carry the chat template a run trained chats with (or was given, or
        started with), so every tool that reads the model renders chats the same way."""
        return self.batches.chats or \
            self.cfg.chat_template is not None or \
            (self.start.point.model_dir / TEMPLATE_FILE).is_file()

    # -- checkpoints ---------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        state = {**self.progress.state_dict(), "seed": self.start.seed,
                 "sampler": self.batches.state_dict(),
                 "noise_rng": self.batches.noise_rng.bit_generator.state, "rng": rng_state(),
                 "config": dataclasses.asdict(self.cfg), **self.objective.state}
        if self.opt.scaler.is_enabled():
            state["scaler"] = self.opt.scaler.state_dict()
        return state

    def save(self) -> None:
        """Collective: gathers what every rank holds, rank 0 writes, the others wait for it."""
        step, parallel = self.progress.step, self.model.parallel
        self.log(f"Saving {self.run_dir.path / f'model-{step}'}")
        model, extras = parallel.full_model(), [self.template.save] if self.saves_template \
            else []
        extras += self.objective.extras
        if self.model.lora_base is not None:
            model, adapter = lora_checkpoint(parallel.model, self.model.lora_base)
            extras.append(adapter)
        tensors, meta = optim.optimizer_state(self.opt.optimizer, parallel.model,
                                              gather=parallel.sharded)
        ranks = distributed.all_gather_object(
            {"noise_rng": self.batches.noise_rng.bit_generator.state, "rng": rng_state()},
            self.dist)
        if self.is_main:
            state = {**self.trainer_state(), "ranks": ranks, "world_size": self.dist.world_size}
            replace = self.cfg.restore_from == "fresh" and self.cfg.overwrite and \
                not self.replaced_old_run
            # Later saves copy the encoder from the newest checkpoint, which pruning never
            # removes; the directory the run started from may be pruned (a resumed run's).
            self.encoder_dir = self.run_dir.save(
                step, model, tensors, meta, state, encoder_dir=self.encoder_dir,
                keep=self.cfg.keep_checkpoints, remove_others=replace,
                extra=lambda tmp: [write(tmp) for write in extras])
        # No rank races ahead (or exits) before the checkpoint is on disk.
        distributed.barrier(self.dist)
        self.replaced_old_run = True
        self.last_saved = step


def train(cfg: TrainConfig, join: Callable[[], DistInfo] | None = None) -> int:
    """Run training as ``gpt2 train`` does; returns the exit code.

    The flags are checked first (one line naming a bad one), then the process joins its
    launcher's group (torchrun, mpirun, srun: torch.distributed; ``join``: another way, e.g.
    Horovod's); a rank that dies or hangs makes the others fail after --dist_timeout minutes
    with one line, not a hang.
    """
    cfg.validate()
    with distributed.process_group(cfg.device, cfg.dist_timeout,
                                   join() if join else None) as dist:
        return Trainer(cfg, dist).run()

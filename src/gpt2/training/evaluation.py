"""What the training loop measures on a schedule: the validation loss, benchmarks, samples.

    validation = Validation(batches.val_batches, model, objective, dist, log)
    losses = validation.run(stop)      # {"val_loss": ...}; None: a stop came during the pass
    scores = TaskEvals(cfg, model, encoder, dist).run(stop)   # {"hellaswag_acc_norm": ...}
    texts = training_samples(model, encoder, cfg, start, step, dist)

All run the model as built (uncompiled, in eval mode) across every rank: under FSDP each
forward is a collective, so every rank runs as many batches, and the result is shared.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from ..runtime import autocast
from ..sampling import sample_sequence
from . import distributed
from .batches import Batch
from .build import TrainingModel
from .config import TrainConfig
from .distributed import DistInfo


class Validation:
    """The objective's mean loss (and metrics) over fixed validation batches, shared out across
    the ranks."""

    def __init__(self, batches: list[Batch], model: TrainingModel, objective, dist: DistInfo,
                 log: Callable[[str], None]):
        self.batches, self.model, self.objective, self.dist, self.log = \
            batches, model, objective, dist, log

    def __bool__(self) -> bool:
        return bool(self.batches)

    @torch.no_grad()
    def run(self, stop) -> dict[str, float] | None:
        """``{"val_loss": ..., "val_<metric>": ...}``; None as soon as ``stop.requested`` is
        set on any rank (Ctrl-C stops within a batch, not after the whole pass)."""
        self.log("Calculating validation loss...")
        batches, parallel, device = self.batches, self.model.parallel, self.dist.device
        model = parallel.eval_model
        model.eval()
        total, names, count = None, [], 0.0
        try:
            for i in tqdm(distributed.my_share(len(batches), self.dist),
                          disable=not self.dist.is_main):
                if distributed.broadcast_flag(stop.requested, self.dist):
                    return None
                batch = batches[min(i, len(batches) - 1)].to(device)
                with parallel.synced(training=False), autocast(device, self.model.precision):
                    loss, metrics = self.objective(model, batch, self.model.loss_chunk)
                names = ["loss", *metrics]
                values = torch.stack([loss.float(), *(v.float() for v in metrics.values())]
                                     ).double().cpu()
                if i < len(batches):  # padding batches (FSDP) run but count zero
                    total, count = values if total is None else total + values, count + 1
        finally:
            model.train()
        if total is None:  # this rank ran only padding batches
            total = torch.zeros(len(names), dtype=torch.float64)
        # mean(sum) / mean(count) over ranks = sum / count over all batches
        total = distributed.all_reduce_mean_tensor(total, self.dist)
        count = distributed.all_reduce_mean(count, self.dist)
        return {f"val_{k}": v / count for k, v in zip(names, total.tolist())}


class TaskEvals:
    """--eval_tasks scored as ``gpt2 evaluate --task`` scores them (:mod:`gpt2.tasks`): the
    rows are read once (--eval_limit), split across the ranks (every world-th row; under FSDP
    every rank scores every row, since each forward is a collective), and the sums added up."""

    def __init__(self, cfg: TrainConfig, model: TrainingModel, encoder, dist: DistInfo,
                 log: Callable[[str], None]):
        from ..tasks import TASKS

        self.model, self.encoder, self.dist, self.log = model, encoder, dist, log
        self.tasks = TASKS
        self.rows = {task: TASKS[task].read(path, cfg.eval_limit)
                     for task, path in (cfg.eval_files() if cfg.eval_every else {}).items()}
        self.mine = {task: [rows[i] for i in self.shares(len(rows))[dist.rank]]
                     for task, rows in self.rows.items()}
        # Rows per forward: the training batch's (HellaSwag's examples are 4 rows each).
        self.batch_rows = cfg.batch_size

    @torch.no_grad()
    def run(self, stop) -> dict | None:
        """``{task}_{metric}`` of every task (and ``{task}_examples``); None when a stop was
        requested on any rank during the pass (all ranks agree before every batch)."""
        from ..tasks import Stopped

        parallel, device, dist = self.model.parallel, self.dist.device, self.dist
        checks = 0

        def stopping() -> bool:  # a collective: every rank makes as many of these calls
            nonlocal checks
            checks += 1
            return distributed.broadcast_flag(stop.requested, dist)

        model = parallel.eval_model
        model.eval()
        sums = {}
        try:
            for task, rows in self.mine.items():
                self.log(f"Scoring {task} ({len(self.rows[task])} examples)...")
                batch = max(1, self.batch_rows // self.tasks[task].rows_per_example)
                checks = 0
                with parallel.synced(training=False), autocast(device, self.model.precision):
                    sums[task] = self.tasks[task].sums(model, self.encoder, rows,
                                                       batch_size=batch,
                                                       progress=self.dist.is_main, stop=stopping)
                # A shorter share ran fewer batches: it still checks as often as the longest.
                longest = max(map(len, self.shares(len(self.rows[task]))))
                for _ in range(-(-longest // batch) - checks):
                    if stopping():
                        raise Stopped
        except Stopped:
            return None
        finally:
            model.train()
        out = {}
        for task, parts in sums.items():
            if not parallel.sharded:  # shares of the rows: add them up
                parts = {k: distributed.all_reduce_mean(float(v), dist) * dist.world_size
                         for k, v in parts.items()}
            result = self.tasks[task].summarize(parts)
            out.update({f"{task}_{k}": result[k] for k in self.tasks[task].shown})
            out[f"{task}_examples"] = round(result["examples"])
        return out

    def shares(self, n: int) -> list[range]:
        """Which of ``n`` rows each rank scores: every world-th, or (FSDP) all of them."""
        if self.model.parallel.sharded:
            return [range(n)] * self.dist.world_size
        return [range(r, n, self.dist.world_size) for r in range(self.dist.world_size)]


def training_samples(model: TrainingModel, encoder, cfg: TrainConfig, seed: int, step: int,
                     length: int, dist: DistInfo,
                     prompts: Callable[[int], list[tuple[list[int], list[int]]]] | None = None
                     ) -> list[str]:
    """``--sample_num`` samples of ``length`` tokens from ``<|endoftext|>``, in batches of
    ``--batch_size``; with ``prompts`` (examples: held-out prompts and their reference answers),
    the model's reply to each beside the reference. The same texts on every rank (a seed per
    step and sample)."""
    top_k, top_p = (0, cfg.top_p) if cfg.top_p > 0 else (cfg.top_k, 1.0)

    def generate(context: list[int], n: int, length: int, index: int) -> torch.Tensor:
        rows = torch.tensor([context] * n, dtype=torch.long, device=dist.device)
        with model.parallel.synced(training=False), autocast(dist.device, model.precision):
            # Under FSDP every rank must run the (sharded) forward; same seed, same text.
            return sample_sequence(model.parallel.eval_model, length, rows, temperature=1.0,
                                   top_k=top_k, top_p=top_p,
                                   seed=seed * 1_000_003 + step * 1009 + index)[:, len(context):]

    texts: list[str] = []
    if prompts is not None:
        n_ctx = model.parallel.model.config.n_ctx
        for prompt, reference in prompts(cfg.sample_num):
            reply = generate(prompt, 1, max(1, min(length, n_ctx - len(prompt))), len(texts))[0]
            reply = reply.tolist()
            if encoder.eot_token in reply:
                reply = reply[:reply.index(encoder.eot_token) + 1]
            texts.append(f"PROMPT:\n{encoder.decode(prompt)}\nREPLY:\n{encoder.decode(reply)}\n"
                         f"REFERENCE:\n{encoder.decode(reference)}")
        return texts
    while len(texts) < cfg.sample_num:
        n = min(cfg.batch_size, cfg.sample_num - len(texts))
        # The original seeded each sample with one random data token; <|endoftext|> is what a
        # document start looks like, and it keeps the data sampler's RNG untouched.
        out = generate([encoder.eot_token], n, length, len(texts))
        texts += [encoder.decode(row.tolist()) for row in out]
    return texts

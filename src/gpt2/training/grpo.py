"""GRPO (Shao et al. 2024): learning from rewards that code computes, as TRL's GRPOTrainer does
by default. For each prompt the model samples ``--num_generations`` completions (the project's
batched KV-cache decoder); reward functions score them; each completion's advantage is its
reward's distance from its group's mean, in group standard deviations; the loss is the clipped
policy-ratio objective per completion token, normalised by the batch's completion tokens
(TRL's default ``loss_type="dapo"``), plus ``--kl_coef`` x the k3 estimate of the KL to a
frozen copy of the starting model when asked (times the policy ratio, TRL's default
``use_bias_correction_kl``).

    batches = load_prompt_batches(cfg, encoder, template, start, dist, log)
    objective = GRPO(cfg, model, encoder, rewards, reference)
    loss, metrics = objective(train_module, batches.next())

Rewards: ``exact_match`` (the completion, stripped, equals the record's ``--answer_field``),
``regex`` (it matches ``--reward_regex`` whole), or ``module:function`` (your own, called as TRL
calls them: ``function(prompts=..., completions=..., completion_ids=..., **other fields)``,
one number per completion, None for "does not apply"), several with ``--reward_weights``.
Generations are seeded by the run's seed and the batch's place in its stream, so a resumed run
samples what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import Prompt, PromptSet, load_prompts
from ..errors import UserError
from ..sampling import decode
from .batches import ExampleBatches, read_splits
from .config import TrainConfig
from .distributed import DistInfo
from .pairs import collate_sequences
from .start import Start

BUILT_IN = ("exact_match", "regex")


# --- rewards ---------------------------------------------------------------------------------

def _exact_match(field: str):
    def exact_match(prompts, completions, **fields):
        if field not in fields:
            raise UserError(f'--reward exact_match: the records have no "{field}" field '
                            "(--answer_field names it)")
        return [float(_text(c).strip() == str(a).strip())
                for c, a in zip(completions, fields[field])]
    return exact_match


def _regex(pattern: str):
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UserError(f"--reward_regex: {e}") from None

    def regex(prompts, completions, **fields):
        return [float(compiled.fullmatch(_text(c).strip()) is not None) for c in completions]
    return regex


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def _imported(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--reward {spec!r}: give exact_match, regex or module:function")
    if os.getcwd() not in sys.path:  # your reward module, beside your data
        sys.path.insert(0, os.getcwd())
    try:
        found = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UserError(f"--reward {spec}: cannot import {module} ({e})") from None
    except AttributeError:
        raise UserError(f"--reward {spec}: {module} has no {name}") from None
    if not callable(found):
        raise UserError(f"--reward {spec}: {name} is not a function")
    return found


@dataclass
class Rewards:
    """The reward functions of a run and their weights."""

    functions: list[Callable]
    names: list[str]
    weights: list[float]

    @classmethod
    def of(cls, cfg: TrainConfig) -> Rewards:
        specs = [s.strip() for s in cfg.reward.split(",") if s.strip()]
        if not specs:
            raise UserError("--reward: name at least one reward")
        functions = [_exact_match(cfg.answer_field) if s == "exact_match" else
                     _regex(cfg.reward_regex) if s == "regex" else _imported(s) for s in specs]
        weights = [1.0] * len(specs)
        if cfg.reward_weights:
            try:
                weights = [float(w) for w in cfg.reward_weights.split(",")]
            except ValueError:
                raise UserError(f"--reward_weights {cfg.reward_weights!r}: numbers, comma-"
                                "separated") from None
            if len(weights) != len(specs):
                raise UserError(f"--reward_weights: {len(weights)} weights for {len(specs)} "
                                "rewards")
        names = [s.partition(":")[2] or s for s in specs]
        return cls(functions, names, weights)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 fields: list[dict]) -> np.ndarray:
        """[completions, functions] rewards (NaN: the function said None)."""
        columns = {k: [f.get(k) for f in fields] for k in {k for f in fields for k in f}}
        out = np.full((len(completions), len(self.functions)), np.nan)
        for j, (fn, name) in enumerate(zip(self.functions, self.names)):
            try:
                values = fn(prompts=prompts, completions=completions,
                            completion_ids=completion_ids, **columns)
            except UserError:
                raise
            except Exception as e:  # the user's code: one line, and where it failed
                at = traceback.extract_tb(e.__traceback__)[-1]
                raise UserError(f"--reward {name}: {type(e).__name__}: {e} (at "
                                f"{at.filename}:{at.lineno})") from None
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                raise UserError(f"--reward {name}: returned {type(values).__name__} of "
                                f"{len(values) if hasattr(values, '__len__') else '?'} values "
                                f"for {len(completions)} completions")
            for i, v in enumerate(values):
                if v is not None and not (isinstance(v, (int, float)) and
                                          not isinstance(v, bool)):
                    raise UserError(f"--reward {name}: returned {v!r}, not a number")
                out[i, j] = math.nan if v is None else float(v)
        return out


def group_advantages(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each completion's group standard deviation): TRL's ``scale_rewards="group"``
    (the unbiased standard deviation, + 1e-4)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    std = grouped.std(1).repeat_interleave(group)
    return (rewards - mean) / (std + 1e-4), std


def grpo_token_loss(logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, epsilon: float, kl_coef: float = 0.0,
                    ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped objective of [N, T] completion-token log-probs (``old``: those it sampled
    with), advantages [N], over ``mask``'s tokens: the loss, the clipped fraction, the KL."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    a = advantages[:, None]
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    stats = {}
    if kl_coef:  # k3, times the ratio: the unbiased reverse-KL gradient (TRL's default)
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + kl_coef * kl * coef_1
        stats["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    mask = mask.to(per_token.dtype)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    clipped = ((coef_1 < 1 - epsilon) & (a < 0)) | ((coef_1 > 1 + epsilon) & (a > 0))
    stats["clip_ratio/region_mean"] = (clipped * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


# --- prompts as batches ----------------------------------------------------------------------

@dataclass
class PromptBatch:
    prompts: list[Prompt]
    seed: int  # the generations' seed: the run's, and the batch's place in its stream

    def to(self, device) -> PromptBatch:
        return self


class PromptBatches(ExampleBatches):
    """Prompts in shuffled epochs, each rank its own (ExampleBatches' stream and state); a
    batch is ``--batch_size`` prompts, each sampled ``--num_generations`` times."""

    def __init__(self, train: PromptSet, val: PromptSet | None, cfg: TrainConfig, n_ctx: int,
                 n_vocab: int, eot: int, seed: int, dist: DistInfo):
        self.prompt_sets = {"train": train, "val": val}
        super().__init__(train, val, dataclasses.replace(cfg, packing=False), n_ctx, n_vocab,
                         eot, seed, dist)

    def next(self) -> PromptBatch:
        where = (self.epoch, self.position)
        rows = [self._take()[0] for _ in range(self.batch_size)]
        seed = int(np.random.SeedSequence([self.seed, 5, *where, self.rank]).generate_state(1)[0])
        return PromptBatch(rows, seed)

    def _val_batches(self, cfg: TrainConfig) -> list[PromptBatch]:
        prompts = self.val.examples[:cfg.val_batch_count * cfg.val_batch_size]
        return [PromptBatch(prompts[i:i + cfg.val_batch_size], 1_000_003 * (i + 1))
                for i in range(0, len(prompts), cfg.val_batch_size)]

    def sample_prompts(self, n: int) -> list[tuple[list[int], list[int]]]:
        return [(p.ids.tolist(), []) for p in (self.val or self.prompt_sets["train"]).examples[:n]]


def load_prompt_batches(cfg: TrainConfig, encoder, template, start: Start, dist: DistInfo,
                        log: Callable[[str], None]) -> PromptBatches:
    """The run's prompts (:func:`~.batches.read_splits`), each leaving room for
    --max_completion_length tokens."""
    n_ctx = start.config.n_ctx
    if cfg.max_completion_length >= n_ctx:
        raise UserError(f"--max_completion_length {cfg.max_completion_length} leaves no room "
                        f"for a prompt in n_ctx {n_ctx}")
    room = n_ctx - cfg.max_completion_length
    log("Loading prompts...")
    train, val = read_splits(cfg, lambda path: load_prompts(path, encoder, template, room=room),
                             "prompts", log)
    return PromptBatches(train, val, cfg, n_ctx, start.config.n_vocab, encoder.eot_token,
                         start.seed, dist)


# --- the objective ---------------------------------------------------------------------------

class CompletionTokens:
    """Sequences (prompt + completion) one a row, and where each completion token sits: the
    completions' token log-probs come out as [sequences, longest completion]."""

    def __init__(self, seqs: list[tuple[np.ndarray, int]], pad: int, device: torch.device):
        self.batch = collate_sequences([[s] for s in seqs], max(len(s) for s, _ in seqs),
                                       pad).to(device)
        self.where = self.batch.answers
        self.seq = self.batch.sequences[self.where]
        starts = torch.tensor([n for _, n in seqs], device=device)
        self.pos = torch.nonzero(self.where)[:, 1] - starts[self.seq]
        self.shape = (len(seqs), max(len(s) - n for s, n in seqs))
        self.mask = torch.zeros(self.shape, dtype=torch.bool, device=device)
        self.mask[self.seq, self.pos] = True

    def logps(self, model, temperature: float) -> torch.Tensor:
        """The completion tokens' log-probs at the sampling temperature (as TRL scores them),
        0 past each completion's end."""
        logits = model(self.batch.inputs, segments=self.batch.segments).float() / temperature
        logps = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, self.batch.inputs[:, 1:, None]).squeeze(-1)
        logps = F.pad(logps, (1, 0))  # each token's log-prob at its own position
        out = torch.zeros(self.shape, device=logps.device, dtype=logps.dtype)
        return out.index_put((self.seq, self.pos), logps[self.where])


class GRPO:
    """Sample, score, and the clipped policy-ratio loss of one batch of prompts."""

    extras: list = []

    def __init__(self, cfg: TrainConfig, generator_model: torch.nn.Module, encoder,
                 rewards: Rewards, reference: torch.nn.Module | None, device: torch.device,
                 state: dict | None = None, template=None):
        self.cfg, self.generator_model, self.encoder = cfg, generator_model, encoder
        self.template = template  # a chat reply's content: without the template's prefix
        self.rewards, self.reference, self.device = rewards, reference, device
        self.state = state or {}

    def sample(self, batch: PromptBatch) -> tuple[list[list[int]], list[Prompt]]:
        """--num_generations completions of each prompt (ids, ending at <|endoftext|> or at
        --max_completion_length), and the prompt of each."""
        g, eot = self.cfg.num_generations, self.encoder.eot_token
        prompts = [p for p in batch.prompts for _ in range(g)]
        gen = torch.Generator(self.device).manual_seed(batch.seed)
        new = decode(self.generator_model, [p.ids.tolist() for p in prompts],
                     self.cfg.max_completion_length, self.cfg.generation_temperature, 0, 1.0,
                     gen, finished=lambda row, ids: ids[-1] == eot)
        return [ids[:ids.index(eot) + 1] if eot in ids else ids for ids in new], prompts

    def __call__(self, model, batch: PromptBatch, chunk: int = 0):
        cfg = self.cfg
        completions, prompts = self.sample(batch)
        texts = [self.encoder.decode([t for t in c if t != self.encoder.eot_token])
                 for c in completions]
        given = [p.prompt for p in prompts]
        shown = texts if all(isinstance(p, str) for p in given) else \
            [[{"role": "assistant", "content": self.template.content_of(t)}] for t in texts]
        per_function = self.rewards(given, shown, completions, [p.fields for p in prompts])
        reward = torch.tensor(np.nansum(per_function * np.asarray(self.rewards.weights), axis=1),
                              dtype=torch.float32, device=self.device)
        advantages, std = group_advantages(reward, cfg.num_generations)
        seqs = [(np.concatenate([p.ids, np.asarray(c, np.int32)]), len(p.ids))
                for p, c in zip(prompts, completions)]
        tokens = CompletionTokens(seqs, self.encoder.eot_token, self.device)
        logps = tokens.logps(model, cfg.generation_temperature)
        ref = None
        if cfg.kl_coef:
            with torch.no_grad():
                ref = tokens.logps(self.reference, cfg.generation_temperature)
        loss, stats = grpo_token_loss(logps, logps.detach(), advantages, tokens.mask,
                                      cfg.epsilon, cfg.kl_coef, ref)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        eot = self.encoder.eot_token
        metrics = {"reward": reward.mean(), "reward_std": std.mean(),
                   "frac_reward_zero_std": (std.view(-1, cfg.num_generations)[:, 0] == 0
                                            ).float().mean(),
                   "completions/mean_length": lengths.mean(),
                   "completions/clipped_ratio": torch.tensor(
                       [float(eot not in c) for c in completions]).mean(),
                   **stats}
        for j, name in enumerate(self.rewards.names):
            column = torch.tensor(per_function[:, j], dtype=torch.float32)
            metrics[f"rewards/{name}/mean"] = column.nanmean()
            metrics[f"rewards/{name}/std"] = column[~column.isnan()].std() \
                if (~column.isnan()).sum() > 1 else torch.zeros(())
        return loss, {k: v.detach().to(self.device) for k, v in metrics.items()}

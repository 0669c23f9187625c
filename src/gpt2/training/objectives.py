"""What a batch's loss is: language modelling (SFT and pre-training), or preference tuning.

    objective = build_objective(cfg, model, batches, start, dist, log)
    loss, metrics = objective(module, batch, loss_chunk)   # a 0-d loss; metrics: 0-d tensors
    objective.extras                                        # writers of what a checkpoint keeps

The loop calls an objective and never asks which one it has; each is built and tested alone.

- ``sft``: the cross-entropy of the batch's targets (the model's own loss).
- ``dpo`` (Rafailov et al. 2023) with ``--dpo_loss sigmoid`` (and ``--label_smoothing``, the
  conservative DPO of Mitchell 2023), ``ipo`` (Azar et al. 2023, log-ratios averaged per answer
  token as TRL does) or ``hinge`` (SLiC, Zhao et al. 2023), against a reference: a frozen copy
  of the starting model, the same model with its LoRA adapters off, or log-probabilities
  computed once before training (stored in every checkpoint).
- ``orpo`` (Hong et al. 2024): the chosen sequences' cross-entropy (prompt included, as TRL's
  ORPOTrainer) minus ``beta`` x the log-sigmoid of the odds ratio of the mean answer log-probs.
- ``simpo`` (Meng et al. 2024): ``-log sigmoid(beta x (mean logp chosen - mean logp rejected)
  - gamma)``, TRL's CPOTrainer with ``loss_type="simpo"`` and ``cpo_alpha=0``.
- ``grpo``: rewards on sampled completions (:mod:`.grpo`).

The metrics carry TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and ORPO's ``nll_loss``,
``log_odds_ratio``, ``log_odds_chosen``), means over the batch's pairs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.examples import IGNORE
from ..data.preferences import is_preference
from ..errors import UserError
from ..lora import adapters_off, lora_layers
from ..runtime import autocast
from .build import TrainingModel
from .config import TrainConfig
from .distributed import DistInfo
from .batches import ExampleBatches, TextBatches, load_batches
from .grpo import GRPO, PromptBatches, Rewards, load_prompt_batches
from .pairs import PairBatch, PairBatches, load_pair_batches
from .start import Start

REFERENCE_FILE = "reference_logps.safetensors"


class LanguageModelling:
    """The cross-entropy of the targets: what the model's forward computes itself."""

    extras: list[Callable[[Path], None]] = []  # what each checkpoint also writes
    state: dict = {}                           # what trainer_state.json also keeps

    def __call__(self, model, batch, chunk: int = 0) -> tuple[torch.Tensor, dict]:
        return model(batch.inputs, targets=batch.targets, segments=batch.segments,
                     loss_chunk=chunk), {}


def sequence_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed answer log-probs [2P], answer tokens [2P], the chosen sequences' mean
    cross-entropy over every token but their first) of a batch of packed pairs."""
    nll = model(batch.inputs, targets=batch.targets, segments=batch.segments, reduction="none")
    token_nll = F.pad(nll[:, :-1], (1, 0)).float()  # position t predicts token t + 1: now at t
    S = batch.count
    seq = batch.sequences.clamp(min=0).reshape(-1)
    answer = batch.answers.reshape(-1).float()
    flat = token_nll.reshape(-1)
    sums = -torch.zeros(S, device=flat.device).index_add(0, seq, flat * answer)
    counts = torch.zeros(S, device=flat.device).index_add(0, seq, answer)
    chosen = ((batch.sequences >= 0) & (batch.sequences % 2 == 0) &
              (batch.targets != IGNORE)).reshape(-1).float()
    chosen_nll = (flat * chosen).sum() / chosen.sum().clamp(min=1)
    return sums, counts, chosen_nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _conservative(logits: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * logits) * (1 - smoothing) - \
        F.logsigmoid(-beta * logits) * smoothing


def preference_losses(kind: str, cfg: TrainConfig, logps: torch.Tensor, counts: torch.Tensor,
                      reference: torch.Tensor | None, chosen_nll: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (mean over pairs) and TRL's metrics, from the sequences' summed log-probs
    (chosen, rejected, chosen, ...), their answer lengths and the reference's log-probs."""
    beta = cfg.beta
    pc, pr = logps[0::2], logps[1::2]
    nc, nr = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    metrics = {}
    if kind == "dpo":
        chosen, rejected = pc - reference[0::2], pr - reference[1::2]
        delta = chosen - rejected
        if cfg.dpo_loss == "sigmoid":
            losses = _conservative(delta, beta, cfg.label_smoothing)
        elif cfg.dpo_loss == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:  # ipo: per answer token
            losses = (chosen / nc - rejected / nr - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        metrics["logps/chosen"], metrics["logps/rejected"] = pc.mean(), pr.mean()
    else:  # both score the answers' mean log-probs, without a reference
        chosen, rejected = pc / nc, pr / nr
        if kind == "orpo":
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            ratio = F.logsigmoid(log_odds)
            loss = chosen_nll - beta * ratio.mean()
            metrics.update({"nll_loss": chosen_nll, "log_odds_ratio": ratio.mean(),
                            "log_odds_chosen": log_odds.mean()})
        else:  # simpo
            loss = _conservative(chosen - rejected - cfg.simpo_gamma / beta, beta,
                                 cfg.label_smoothing).mean()
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen.mean(), rejected.mean()
    chosen, rejected = beta * chosen.detach(), beta * rejected.detach()
    metrics.update({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                    "rewards/accuracies": (chosen > rejected).float().mean(),
                    "rewards/margins": (chosen - rejected).mean()})
    return loss, {k: v.detach() for k, v in metrics.items()}


class Preference:
    """DPO, ORPO or SimPO over batches of packed pairs (:class:`~.pairs.PairBatch`)."""

    def __init__(self, cfg: TrainConfig, reference: Callable[[PairBatch], torch.Tensor] | None,
                 extras: list[Callable[[Path], None]] | None = None, state: dict | None = None):
        self.cfg, self.reference, self.extras = cfg, reference, extras or []
        self.state = state or {}

    def __call__(self, model, batch: PairBatch, chunk: int = 0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, counts, chosen_nll = sequence_logps(model, batch)
        reference = None
        if self.cfg.objective == "dpo":
            reference = batch.reference if batch.reference is not None else \
                self.reference(batch)
        return preference_losses(self.cfg.objective, self.cfg, logps, counts, reference,
                                 chosen_nll)


def reference_kind(cfg: TrainConfig) -> str:
    """copy, adapters or precomputed: what --reference says, or its default."""
    return cfg.reference or ("adapters" if cfg.lora_rank else "copy")


def _forward_reference(module, model: TrainingModel, device: torch.device,
                       off: Callable[[], contextlib.AbstractContextManager]):
    @torch.no_grad()
    def reference(batch: PairBatch) -> torch.Tensor:
        was_training = module.training
        module.eval()
        try:
            with off(), autocast(device, model.precision):
                return sequence_logps(module, batch)[0]
        finally:
            module.train(was_training)
    return reference


def reference_logps_of(batches: PairBatches, which: str, forward, dist: DistInfo,
                       batch_size: int) -> np.ndarray:
    """[pairs, 2]: the reference's log-probs of every pair of a set (each rank computes them
    all: under FSDP every forward is a collective, and each rank needs the values)."""
    out = []
    for batch in tqdm(batches.all_batches(which, batch_size), desc=f"reference log-probs "
                      f"({which})", disable=not dist.is_main, leave=False):
        out.append(forward(batch.to(dist.device)).float().cpu().numpy().reshape(-1, 2))
    return np.concatenate(out).astype(np.float64)


def _stored_reference(path: Path, fingerprints: dict[str, str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path.parent}: this checkpoint has no {REFERENCE_FILE}; resume it with "
                        "the --reference it was trained with, or start afresh")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        for which, fingerprint in fingerprints.items():
            if meta.get(which) != fingerprint:
                raise UserError(f"{path}: computed for other {which} pairs than this run's "
                                "(the dataset, its tokenizer or n_ctx changed)")
        return {which: f.get_tensor(which) for which in fingerprints}


def precomputed_reference(cfg: TrainConfig, model: TrainingModel, batches: PairBatches,
                          start: Start, dist: DistInfo, log: Callable[[str], None]
                          ) -> Callable[[Path], None]:
    """The reference log-probs of every pair, put into ``batches``: read from the checkpoint
    a run resumes from, or computed now by the starting model (which is the reference). The
    writer that stores them in each checkpoint is returned."""
    from safetensors.numpy import save_file

    sets = {w: s for w, s in batches.pair_sets.items() if s is not None}
    fingerprints = {w: s.fingerprint() for w, s in sets.items()}
    if start.resume:
        values = _stored_reference(start.point.model_dir / REFERENCE_FILE, fingerprints)
    else:
        log("Computing the reference log-probabilities once (--reference precomputed)...")
        forward = _forward_reference(model.parallel.eval_model, model, dist.device,
                                     contextlib.nullcontext)
        values = {w: reference_logps_of(batches, w, forward, dist, cfg.batch_size)
                  for w in sets}
        # FSDP keeps the root's parameters gathered after a forward (a backward would need
        # them): shard them again, or the optimizer built next holds the gathered ones.
        for module in model.parallel.eval_model.modules():
            if hasattr(module, "reshard"):
                module.reshard()
    batches.reference = {**{"val": None}, **values}
    batches.val_batches = batches.collate_val() if batches.val is not None else []

    def write(checkpoint: Path) -> None:
        from ..files.atomic import atomic_write

        atomic_write(checkpoint / REFERENCE_FILE,
                     lambda tmp: save_file(values, str(tmp), metadata=fingerprints))
    return write


def load_training_batches(cfg: TrainConfig, encoder, template, start: Start, dist: DistInfo,
                          log: Callable[[str], None]
                          ) -> TextBatches | ExampleBatches | PairBatches | PromptBatches:
    """What --objective learns from: text or examples (sft), preference pairs, or prompts
    (grpo); a dataset that does not hold it is refused before it is read."""
    pairs = is_preference(cfg.dataset)
    if cfg.objective in ("sft", "grpo") and pairs:
        raise UserError(f"{cfg.dataset}: holds preference pairs (chosen/rejected); train on "
                        "them with --objective dpo, orpo or simpo")
    if cfg.objective in ("dpo", "orpo", "simpo") and not pairs:
        raise UserError(f"--objective {cfg.objective}: {cfg.dataset} holds no preference pairs "
                        '(records with "chosen" and "rejected")')
    if pairs:
        return load_pair_batches(cfg, encoder, template, start, dist, log)
    if cfg.objective == "grpo":
        return load_prompt_batches(cfg, encoder, template, start, dist, log)
    return load_batches(cfg, encoder, template, start, dist, log)


def build_objective(cfg: TrainConfig, model: TrainingModel, batches, start: Start,
                    dist: DistInfo, log: Callable[[str], None], encoder=None, template=None):
    """The run's objective, its reference set up (a copy, the adapters, or the stored values)."""
    if cfg.objective == "sft":
        return LanguageModelling()
    if cfg.objective == "grpo":
        if model.parallel.sharded:
            raise UserError("--objective grpo cannot be combined with --fsdp: each process "
                            "samples its own completions, of their own lengths")
        reference = _reference_copy(model, start, log) if cfg.kl_coef else None
        return GRPO(cfg, model.parallel.eval_model, encoder, Rewards.of(cfg), reference,
                    dist.device, _reference_state(start) if cfg.kl_coef else None, template)
    if cfg.objective != "dpo":
        return Preference(cfg, None)
    kind = reference_kind(cfg)
    if kind == "precomputed":
        return Preference(cfg, None, [precomputed_reference(cfg, model, batches, start, dist,
                                                            log)])
    if kind == "adapters":
        if not lora_layers(model.parallel.model):
            raise UserError("--reference adapters: needs --lora (the reference is the model "
                            "without its adapters)")
        return Preference(cfg, _forward_reference(model.parallel.eval_model, model, dist.device,
                                                  lambda: adapters_off(model.parallel.model)))
    if model.parallel.sharded:
        raise UserError("--reference copy: a whole copy of the model on every process defeats "
                        "--fsdp; use --reference precomputed")
    return Preference(cfg, _forward_reference(_reference_copy(model, start, log), model,
                                              dist.device, contextlib.nullcontext),
                      state=_reference_state(start))


def _reference_state(start: Start) -> dict:
    if start.resume:
        return {"reference_model": start.state["reference_model"]}
    return {"reference_model": str(start.point.model_dir.resolve())}


def _reference_copy(model: TrainingModel, start: Start, log: Callable[[str], None]):
    """A frozen copy of the model the run started from (on a resume: read again from where
    the run first started, which trainer_state.json names)."""
    if start.point.fresh_init:
        raise UserError("--reference copy: a freshly initialised model is no reference; use "
                        "--reference precomputed")
    device = next(model.parallel.model.parameters()).device
    if start.resume:
        from ..io.model_dir import load_model

        path = (start.state or {}).get("reference_model")
        if not path:
            raise UserError(f"{start.point.model_dir}: trained without --reference copy; resume "
                            "it with the --reference it was trained with")
        log(f"Reference: {path}, frozen")
        ref = load_model(path, device="cpu").to(device)
    else:
        log("Reference: a frozen copy of the starting model")
        ref = copy.deepcopy(model.parallel.model)
    return ref.eval().requires_grad_(False)

"""Where a run starts: the weights' directory, the model's config, the saved state, the seed.

    start = plan_start(cfg, run_dir, dist)
    start.point.model_dir     # pretrained model, fresh hparams.json, or the checkpoint resumed
    start.config              # its hparams.json with --dropout applied
    start.state               # trainer_state.json when resuming, else None
    start.seed                # the same on every rank

Nothing here loads weights or data: the decisions come first, every later part is built from
them (data, model, optimizer), and a resume then restores each part's own state.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from ..errors import UserError
from ..io.model_dir import load_config
from ..model import GPTConfig
from . import distributed
from .config import TrainConfig
from .distributed import DistInfo
from .run_dir import RunDir, StartPoint
from .state import read_state


@dataclass(frozen=True)
class Start:
    point: StartPoint
    config: GPTConfig
    state: dict | None
    seed: int
    sample_length: int      # tokens per training sample (--sample_length, else n_ctx - 1)

    @property
    def resume(self) -> bool:
        return self.state is not None


def choose_seed(seed: int | None, state: dict | None, dist: DistInfo) -> int:
    """A resumed run keeps its seed; else --seed, else a random one. The same on every rank:
    a fresh model must start identical everywhere (FSDP does not broadcast), and each rank's
    data stream is then told apart by its rank alone."""
    chosen = state["seed"] if state else (
        seed if seed is not None else random.SystemRandom().randrange(2**31))
    return distributed.broadcast_object(chosen, dist)


def plan_start(cfg: TrainConfig, run_dir: RunDir, dist: DistInfo) -> Start:
    """What ``--restore_from``, the model flags and ``--seed`` say, checked (one line each)."""
    point = run_dir.start_point(cfg.restore_from, cfg.overwrite, cfg.init, cfg.model_name,
                                cfg.models_dir, cfg.model_dir)
    config = load_config(point.model_dir)
    if cfg.dropout is not None:
        config = dataclasses.replace(config, dropout=cfg.dropout)
    sample_length = cfg.sample_length or config.n_ctx - 1
    if sample_length > config.n_ctx:
        raise UserError(f"--sample_length {sample_length} is longer than the model's n_ctx "
                        f"({config.n_ctx})")
    # Saved state comes first: it fixes the seed every random stream derives from.
    state = read_state(point.model_dir) if point.resume else None
    return Start(point, config, state, choose_seed(cfg.seed, state, dist), sample_length)

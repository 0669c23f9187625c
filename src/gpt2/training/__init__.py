"""Training: one config (:mod:`.config`), the loop (:mod:`.loop`), the wrappers applied from
outside the model (:mod:`.parallelize`), the run directory (:mod:`.run_dir`).

    from gpt2.training import TrainConfig, train
    train(TrainConfig(dataset="my.txt", model_name="124M", max_steps=1000))
"""

from .config import TrainConfig, parse_config
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "parse_config", "train"]

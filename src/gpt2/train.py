"""Deprecated alias of :mod:`gpt2.training` (renamed so that importing it cannot hide
``gpt2.train``, the function): ``import gpt2.train.config`` still gives
``gpt2.training.config``, and this module, like the function, trains when called:
``gpt2.train(cfg)``. It goes away in the next release.
"""

import importlib
import sys
import types

from .errors import moved
from .training import *  # noqa: F401,F403
from .training import Trainer, TrainConfig, parse_config, train  # noqa: F401

SUBMODULES = ("batches", "build", "config", "distributed", "evaluation", "loop", "memory",
              "optim", "parallelize", "run_dir", "start", "state", "tensorboard")

moved("gpt2.train", "gpt2.training")
for _name in SUBMODULES:
    _module = importlib.import_module(f"gpt2.training.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    setattr(sys.modules[__name__], _name, _module)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

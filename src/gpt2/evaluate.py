"""Deprecated alias of :mod:`gpt2.perplexity` (renamed so that importing it cannot hide
``gpt2.evaluate``, the function); called, it evaluates: ``gpt2.evaluate(model, chunks)``.
It goes away in the next release.
"""

import sys
import types

from .errors import moved
from .perplexity import *  # noqa: F401,F403
from .perplexity import evaluate, exp_or_inf, windows  # noqa: F401

moved("gpt2.evaluate", "gpt2.perplexity")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""Deprecated alias of :mod:`gpt2.files.atomic`, where it moved (the files layer, below the
model formats of this package); it goes away in the next release."""

from ..errors import moved
from ..files.atomic import *  # noqa: F401,F403

moved("gpt2.io.atomic", "gpt2.files.atomic")

"""Deprecated alias of :mod:`gpt2.files.paths`, where it moved (the files layer, below the
model formats of this package); it goes away in the next release."""

from ..errors import moved
from ..files.paths import *  # noqa: F401,F403

moved("gpt2.io.paths", "gpt2.files.paths")

"""Shared test fixtures: GPT-2's real vocabulary (built offline once) and tiny model configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gpt2_vocab  # noqa: E402

from gpt2.model import GPTConfig  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_vocab_dir() -> Path:
    """A directory holding GPT-2's encoder.json and vocab.bpe (byte-identical to OpenAI's)."""
    return gpt2_vocab.vocab_dir()


@pytest.fixture
def tiny_config() -> GPTConfig:
    """A model small enough for CPU tests in milliseconds (small vocabulary on purpose)."""
    return GPTConfig(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=2)

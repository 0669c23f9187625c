"""Shared test fixtures: GPT-2's real vocabulary (built offline once) and tiny model configs;
and the session's guard against processes that outlive their test (tests/bounded.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Decoding runs eagerly in the suite (and in the commands it starts), as by default: compiling
# the decode step costs seconds per model and dtype. tests/test_capture.py turns it on.
os.environ.setdefault("GPT2_CAPTURE", "0")

import bounded  # noqa: E402
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


def pytest_configure(config) -> None:
    bounded.adopt_orphans()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Whatever a test left running is killed here, so the session always exits (Python's
    multiprocessing would otherwise join a stuck worker forever at exit)."""
    left = bounded.kill_leftovers()
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("warning: killed processes the tests left running:\n  "
                                + "\n  ".join(left), yellow=True)

"""Training windows: uniform over every valid start of every chunk, resumable, per rank.

    sampler = Sampler(chunks, seed=0, rank=0, world_size=1)
    batch = sampler.sample_batch(8, 1024)                 # int64 [8, 1024]
    state = sampler.state_dict()                          # JSON: a resume draws the same windows
    val = validation_batches(chunks, 40, 2, 1024)         # fixed windows, drawn once (seed 1)
"""

from __future__ import annotations

import secrets

import numpy as np

from ..errors import UserError
from .tokens import TokenChunks


class Sampler:
    """Draws training windows uniformly over every valid start position of every chunk.

    A window of length L starts anywhere in [0, len(chunk) - L] (inclusive, so a chunk's last
    token can be read); chunks shorter than L are never used. Draw number i uses its own RNG
    seeded from (seed, rank, i): the state is just a counter, every rank draws different
    windows, and a resumed run draws exactly what an uninterrupted run would have.
    """

    def __init__(self, chunks, seed: int | None = None, rank: int = 0, world_size: int = 1,
                 name: str = "dataset"):
        chunks = TokenChunks.of(chunks)
        self.chunks = chunks.select(chunks.lengths > 0)
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.rank, self.world_size, self.name = int(rank), int(world_size), name
        self.draws = 0
        self.n_tokens = self.chunks.n_tokens
        self._starts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _valid_starts(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(the chunks a window of ``length`` fits in, cumulative counts of their starts)."""
        if length not in self._starts:
            check_window(self.chunks, length, self.name)
            lengths = self.chunks.lengths
            usable = np.flatnonzero(lengths >= length)
            self._starts[length] = (usable, np.cumsum(lengths[usable] - length + 1))
        return self._starts[length]

    def sample_batch(self, batch_size: int, length: int) -> np.ndarray:
        """``[batch_size, length]`` int64 windows."""
        usable, cum = self._valid_starts(length)
        rng = np.random.default_rng([self.seed, self.rank, self.draws])
        self.draws += 1
        picks = rng.integers(0, int(cum[-1]), size=batch_size)
        k = np.searchsorted(cum, picks, side="right")
        offsets = picks - np.where(k > 0, cum[np.maximum(k - 1, 0)], 0)
        return np.stack([self.chunks.window(int(usable[c]), int(o), length)
                         for c, o in zip(k, offsets)]).astype(np.int64)

    def sample(self, length: int) -> np.ndarray:
        """One window of ``length`` tokens."""
        return self.sample_batch(1, length)[0]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        # The rank stays this process's own: one saved state resumes every rank.
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def check_window(chunks, length: int, name: str = "dataset") -> None:
    """One line unless some chunk holds a whole window of ``length`` tokens (the model's n_ctx:
    windows never cross a chunk boundary)."""
    lengths = TokenChunks.of(chunks).lengths
    longest = int(lengths.max()) if len(lengths) else 0
    if longest < length:
        raise UserError(f"{name} has no document of at least {length} tokens (the model's "
                        f"n_ctx; the longest has {longest}); use more or longer text, or a "
                        "larger --combine")


def validation_batches(chunks, n_batches: int, batch_size: int, length: int,
                       seed: int = 1, name: str = "validation data") -> list[np.ndarray]:
    """Fixed validation windows, drawn once (the original: a Sampler seeded 1)."""
    sampler = Sampler(chunks, seed=seed, name=name)
    return [sampler.sample_batch(batch_size, length) for _ in range(n_batches)]


def add_noise(tokens: np.ndarray, p: float, rng: np.random.Generator, n_vocab: int
              ) -> np.ndarray:
    """--noise p: each input token becomes a uniform random id with probability p."""
    if not p:
        return tokens
    mask = rng.random(tokens.shape) < p
    random_ids = rng.integers(0, n_vocab, tokens.shape)
    return np.where(mask, random_ids, tokens)

"""Rows decoded together on one preallocated KV cache: :class:`Decoder`, under every decode loop
(:func:`gpt2.sampling.decode`, speculative decoding, the server's continuous batching)."""

from __future__ import annotations

import torch

from .capture import CapturedStep
from .model import cache_view, empty_kv_cache


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the attention keys and values will have: autocast's, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


class Decoder:
    """Rows decoded together on one preallocated KV cache (use under ``torch.inference_mode``).

        dec = Decoder(model, context, max_new)     # prefill: dec.logits is [B, n_vocab] fp32
        dec.feed(tokens)                           # [B] ids -> the next dec.logits
        dec.keep([0, 2])                           # rows 1, 3, ... leave (their cache with them)
        dec.join(Decoder(model, other, max_new))   # more rows join (the server's batching)

    Keys and values are written in place into buffers with room for ``max_new`` more positions
    (no torch.cat of every layer per token), and the prompt's logits are computed for its last
    position only (``prompt_logits=True``: every position's, kept as :attr:`prompt_logits`).
    Neither changes a single number. Rows of different lengths share the cache left-padded,
    the padding masked out (``GPT.forward(key_mask=...)``); while no row is padded the model is
    called exactly as without ``join``.
    """

    def __init__(self, model: torch.nn.Module, context: torch.Tensor, max_new: int,
                 prompt_logits: bool = False, step: CapturedStep | None = None):
        self.model = model
        self.step = step
        self.device = context.device
        self.length = context.size(1)  # positions in use, padding included
        self.capacity = self.length + max_new
        self.pads = [0] * context.size(0)  # each row's left padding
        self.mask: torch.Tensor | None = None  # [B, capacity] bool, True: a real token
        past = empty_kv_cache(model.config, context.size(0), self.capacity, device=self.device,
                              dtype=_cache_dtype(model, self.device))
        logits, self.past = model(context, past=past, use_cache=True,
                                  last_only=not prompt_logits)
        self.prompt_logits = logits.float() if prompt_logits else None
        self.logits = logits[:, -1, :].float()

    @property
    def rows(self) -> int:
        return self.logits.size(0)

    def _make_room(self, T: int) -> None:
        """Room for ``T`` more positions: the buffers copied into larger ones where full (only
        when positions were masked out: speculative decoding's rejected guesses)."""
        if self.length + T <= self.capacity:
            return
        self.capacity = self.length + T + max(16, self.capacity // 2)
        self.past = [(_regrow(k, self.capacity), _regrow(v, self.capacity))
                     for k, v in self.past]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; returns (and keeps) the next last-position logits."""
        self._make_room(1)
        padded = {}
        if self.mask is not None:
            if self.length == self.mask.size(1):
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], 1)
            self.mask[:, self.length] = True
            padded = {"key_mask": self.mask[:, :self.length + 1]}
        logits = self._captured(tokens) if self.step is not None else None
        if logits is None:
            logits, self.past = self.model(tokens[:, None], past=self.past, use_cache=True,
                                           **padded)
            logits = logits[:, -1, :].float()
        self.length += 1
        self.logits = logits
        return self.logits

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``T`` tokens per row at once ([B, T]: what speculative decoding verifies);
        returns the logits after each [B, T, n_vocab] (fp32), the last kept as :attr:`logits`.
        """
        T = tokens.size(1)
        self._make_room(T)
        padded = {}
        if self.mask is not None:
            end = self.length + T
            if end > self.mask.size(1):
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, end -
                                                                    self.mask.size(1))], 1)
            self.mask[:, self.length:end] = True
            padded = {"key_mask": self.mask[:, :end]}
        logits, self.past = self.model(tokens, past=self.past, use_cache=True, **padded)
        self.length += T
        logits = logits.float()
        self.logits = logits[:, -1]
        return logits

    def retract(self, fed: int, kept: list[int], logits: torch.Tensor) -> None:
        """Of the last ``fed`` positions, row r keeps its first ``kept[r]``; ``logits`` [B, V]
        become the next logits. Where every row keeps as many, the cache is cut back (its
        buffers keep their room); else the dropped positions are masked out, as padding is,
        and positions count the kept tokens only."""
        drop = [fed - k for k in kept]
        if self.mask is None and len(set(drop)) == 1:
            self.length -= drop[0]
            self.past = [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in self.past]
        elif any(drop):
            if self.mask is None:
                self.mask = torch.ones((self.rows, max(self.capacity, self.length)),
                                       dtype=torch.bool, device=self.device)
            for row, n in enumerate(drop):
                if n:
                    self.mask[row, self.length - n:self.length] = False
        self.logits = logits

    def _captured(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The step through :mod:`gpt2.capture` over the whole buffers (which it writes at
        ``length``), or None where that cannot run (no room, a cache that is not a buffer,
        compiling failed): then the eager step runs."""
        full = [tuple(cache_view(t, self.capacity) for t in layer) for layer in self.past]
        if self.length >= self.capacity or any(t is None for layer in full for t in layer):
            return None
        at = torch.arange(self.capacity, device=self.device)
        if self.mask is None:
            mask = (at <= self.length).expand(self.rows, -1).contiguous()
            positions = torch.full((self.rows,), self.length, device=self.device)
        else:  # left-padded rows: a position counts the row's real tokens before it
            # (only the positions in use: what lies past them in self.mask, or past its width
            # after the buffers grew, is no token)
            mask = torch.zeros((self.rows, self.capacity), dtype=torch.bool, device=self.device)
            mask[:, :self.length + 1] = self.mask[:, :self.length + 1]
            positions = self.mask[:, :self.length].sum(1)
        index = torch.tensor([self.length], device=self.device)
        logits = self.step(self.model, tokens, positions, index, full, mask)
        if logits is not None:
            self.past = [(k[:, :, :self.length + 1], v[:, :, :self.length + 1])
                         for k, v in full]
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), copied into buffers that still have room; the
        left padding all of them have is cut off."""
        index = torch.tensor(rows, device=self.device)
        self.pads = [self.pads[i] for i in rows]
        trim = min(self.pads)
        self.pads = [p - trim for p in self.pads]
        self.length -= trim
        self.capacity -= trim
        self.logits = self.logits[index]
        self.past = [(_regrow(k[index][:, :, trim:], self.capacity),
                      _regrow(v[index][:, :, trim:], self.capacity)) for k, v in self.past]
        self.mask = None if self.mask is None else _unless_full(
            self.mask[index][:, trim:], self.length)

    def join(self, other: Decoder) -> None:
        """``other``'s rows join after these; whichever side is shorter is left-padded, and
        every row keeps the room it had."""
        length = max(self.length, other.length)
        capacity = length + max(self.capacity - self.length, other.capacity - other.length)
        mask = torch.zeros((self.rows + other.rows, capacity), dtype=torch.bool,
                           device=self.device)
        past = []
        for mine, theirs in zip(self.past, other.past):
            pair = []
            for a, b in zip(mine, theirs):
                buf = a.new_zeros((a.size(0) + b.size(0), a.size(1), capacity, a.size(3)))
                buf[:a.size(0), :, length - self.length:length].copy_(a)
                buf[a.size(0):, :, length - other.length:length].copy_(b)
                pair.append(buf[:, :, :length])
            past.append(tuple(pair))
        for dec, rows, pad in ((self, slice(0, self.rows), length - self.length),
                               (other, slice(self.rows, None), length - other.length)):
            if dec.mask is None:
                mask[rows, pad:length] = True
            else:
                mask[rows, pad:length] = dec.mask[:, :dec.length]
        self.pads = [p + length - self.length for p in self.pads] + [
            p + length - other.length for p in other.pads]
        self.past, self.length, self.capacity = past, length, capacity
        self.mask = _unless_full(mask, length)
        self.logits = torch.cat([self.logits, other.logits])


def _unless_full(mask: torch.Tensor, length: int) -> torch.Tensor | None:
    """``mask`` (a copy), or None where its first ``length`` columns leave nothing out."""
    return None if bool(mask[:, :length].all()) else mask.clone()


def _regrow(cached: torch.Tensor, capacity: int) -> torch.Tensor:
    """``cached`` [B, H, S, D] copied into a buffer of ``capacity`` positions (a view of S)."""
    B, H, S, D = cached.shape
    buf = torch.zeros((B, H, capacity, D), dtype=cached.dtype, device=cached.device)
    buf[:, :, :S].copy_(cached)
    return buf[:, :, :S]

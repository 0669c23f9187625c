"""Preference pairs: a prompt, the answer preferred and the one rejected, as TRL reads them.

    pairs = load_pairs("prefs.jsonl", encoder, template, n_ctx=1024)
    pair = pairs.pairs[0]
    pair.chosen, pair.rejected, pair.prompt_len   # prompt + answer ids (int32); where each
                                                   # answer starts

Records (fields recognised from the first record, as SFT formats are):

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``: the prompt, then the answer
  and ``<|endoftext|>`` (TRL adds the end-of-sequence token to standard answers too);
- conversational: ``prompt``, ``chosen`` and ``rejected`` lists of messages, rendered through
  the model's chat template (the prompt with the assistant's opening, as generation sees it);
- implicit prompt: ``{"chosen", "rejected"}`` without ``prompt``, whole texts or conversations
  sharing a start: the shared start is the prompt (TRL's ``extract_prompt``: the longest common
  prefix of messages, or of characters, backed off a trailing space).

The prompt and each answer are tokenized together and the answer starts where the two
tokenizations part (TRL does the same): a token merging across the boundary belongs to the
answer. Content is text: a literal ``<|endoftext|>`` in a record is never the special token.
A pair longer than n_ctx (both sequences together: one row holds both) loses the start of its
prompt, then the ends of its answers (``drop_long``: it is dropped). Files as
:mod:`gpt2.data.records` reads them; a bad record is one line naming file:line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .examples import data_files, parse_messages
from .records import describe, records

FIELDS = ("chosen", "rejected")


@dataclass
class Pair:
    """One preference pair: both sequences start with the same ``prompt_len`` prompt tokens."""

    chosen: np.ndarray    # int32: prompt + chosen answer
    rejected: np.ndarray  # int32: prompt + rejected answer
    prompt_len: int
    index: int = 0        # its place in the dataset (the reference log-probs are stored by it)
    where: str = ""

    def __len__(self) -> int:  # the row room the pair takes (both sequences are packed)
        return len(self.chosen) + len(self.rejected)


@dataclass
class PairSet:
    pairs: list[Pair]
    chats: bool = False
    truncated: int = 0
    dropped: int = 0

    @property
    def examples(self) -> list[Pair]:  # what training packs into rows (as an ExampleSet's)
        return self.pairs

    def with_items(self, pairs: list[Pair]) -> PairSet:
        """A set holding ``pairs`` (a split of this one), indexed from 0 again."""
        for i, pair in enumerate(pairs):
            pair.index = i
        return PairSet(pairs, self.chats)

    def describe(self, name: str) -> str:
        tokens = sum(len(p) for p in self.pairs)
        line = f"{name}: {len(self.pairs):,} preference pairs, {tokens:,} tokens"
        if self.truncated:
            line += (f"; {self.truncated:,} longer than n_ctx (both answers together) were cut "
                     "(--drop_long drops them)")
        if self.dropped:
            line += f"; {self.dropped:,} longer than n_ctx dropped (--drop_long)"
        return line

    def fingerprint(self) -> str:
        """What the pairs' tokens are: a store of values per pair belongs to these pairs only."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(np.asarray([len(p.chosen), len(p.rejected), p.prompt_len], np.int64))
            h.update(p.chosen.tobytes())
            h.update(p.rejected.tobytes())
        return h.hexdigest()


def is_preference(path: str | os.PathLike) -> bool:
    """Whether the dataset's first record has ``chosen`` and ``rejected`` fields."""
    files = data_files(path)
    first = next(records(files[0]), None) if files else None
    return bool(first) and isinstance(first[0], dict) and all(f in first[0] for f in FIELDS)


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from two texts or conversations sharing their start."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the answer belongs to it
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _parts(record, where: str):
    """(prompt, chosen, rejected): three strings, or three lists of messages."""
    if not isinstance(record, dict) or not all(f in record for f in FIELDS):
        raise UserError(f"{where}: a preference record needs \"chosen\" and \"rejected\" fields"
                        f" (got {describe(record)})")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    kinds = {type(v) for v in (chosen, rejected, *([prompt] if "prompt" in record else []))}
    if kinds not in ({str}, {list}):
        raise UserError(f'{where}: "prompt", "chosen" and "rejected" must all be strings or all '
                        "lists of messages")
    if isinstance(chosen, list):
        chosen = parse_messages(chosen, where, "chosen")
        rejected = parse_messages(rejected, where, "rejected")
        prompt = parse_messages(prompt, where, "prompt") if "prompt" in record else None
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise UserError(f'{where}: "chosen" and "rejected" share no prompt (give "prompt")')
    if not chosen or not rejected:
        raise UserError(f"{where}: an empty chosen or rejected answer")
    return prompt, chosen, rejected


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(prompt, chosen, rejected, encoder, template, where: str) -> Pair:
    """The pair's two token sequences (see the module docstring)."""
    if isinstance(prompt, str):
        prompt_ids = encoder.encode_ordinary(prompt)
        full = [encoder.encode_ordinary(prompt + answer) + [encoder.eot_token]
                for answer in (chosen, rejected)]
    else:
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise UserError(f"{where}: the chosen and rejected conversations must end with an "
                            "assistant turn")
        prompt_ids = template.encode(prompt, encoder, add_generation_prompt=True)[0]
        full = [template.encode(prompt + answer, encoder)[0] for answer in (chosen, rejected)]
    n = min(common_prefix(prompt_ids, full[0]), common_prefix(prompt_ids, full[1]))
    if n == 0:
        raise UserError(f"{where}: the prompt renders as no tokens before the answers")
    if n in (len(full[0]), len(full[1])):
        raise UserError(f"{where}: an answer renders as no tokens after the prompt")
    return Pair(np.asarray(full[0], np.int32), np.asarray(full[1], np.int32), n, where=where)


def fit_pair(pair: Pair, n_ctx: int) -> Pair:
    """A pair that fits in one row of n_ctx: its prompt's start cut first (one token of the
    prompt is kept), then the answers' ends (the longer one's first)."""
    over = len(pair) - n_ctx
    cut = min(-(-over // 2), pair.prompt_len - 1)
    prompt_len = pair.prompt_len - cut
    a, b = len(pair.chosen) - pair.prompt_len, len(pair.rejected) - pair.prompt_len
    room = n_ctx - 2 * prompt_len  # for both answers
    if room < 2:
        raise UserError(f"{pair.where}: n_ctx {n_ctx} cannot hold this pair")
    if a + b > room:
        small = min(a, b, room // 2)
        a, b = (min(a, room - small), small) if a >= b else (small, min(b, room - small))
    return Pair(pair.chosen[cut:cut + prompt_len + a].copy(),
                pair.rejected[cut:cut + prompt_len + b].copy(), prompt_len, pair.index,
                pair.where)


def load_pairs(path: str | os.PathLike, encoder, template, *, n_ctx: int,
               drop_long: bool = False) -> PairSet:
    """Every preference pair of the dataset at ``path``, tokenized and fitted into n_ctx."""
    from tqdm import tqdm

    files = data_files(path)
    if not files:
        raise UserError(f"{path}: no .jsonl, .json or .parquet files of preference pairs")
    out = PairSet([])
    for file in files:
        for record, where in tqdm(records(file), desc=f"tokenizing {file.name}", unit=" pairs",
                                  disable=None, leave=False):
            prompt, chosen, rejected = _parts(record, where)
            out.chats = out.chats or isinstance(prompt, list)
            pair = encode_pair(prompt, chosen, rejected, encoder, template, where)
            if len(pair) > n_ctx:
                if drop_long:
                    out.dropped += 1
                    continue
                pair, out.truncated = fit_pair(pair, n_ctx), out.truncated + 1
            pair.index = len(out.pairs)
            out.pairs.append(pair)
    if not out.pairs:
        raise UserError(f"{path}: no preference pair left to learn from")
    return out

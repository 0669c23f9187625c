"""Training examples: prompt -> response pairs and chats, as token ids and the targets to learn.

    fmt = dataset_format("train.jsonl")                 # "messages", "alpaca", ..., or "text"
    examples = load_examples("train.jsonl", encoder, template, n_ctx=1024).examples
    examples[0].ids, examples[0].targets      # int32 arrays; targets -100 where not learned

Formats, recognised from the first record's fields (or named: ``--data_format``):

- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (TRL, OpenAI's fine-tuning):
  strings (the prompt, then the completion and ``<|endoftext|>``), or lists of messages (a chat);
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``;
- ``alpaca``: ``{"instruction": ..., "input": ... (optional), "output": ...}``, read with the
  Alpaca prompt (as litgpt and torchtune do);
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
- ``text``: ``{"text": ...}`` (``--text_field``): raw text, trained on as before (not here).

Files: ``.jsonl`` (also ``.gz``/``.bz2``/``.xz``/``.zst``), ``.json`` (a list of records) and
``.parquet`` (``gpt2[parquet]``), one file, a directory or a glob of them. Chats go through the
model's chat template (:mod:`gpt2.tokenizer.chat`). What is learned: the completion or the
assistant turns and the ``<|endoftext|>`` that ends each (so a model learns to stop); with
``train_on_prompt`` every token. A record that does not fit the dataset's format is one line
naming its file and line; so is a dataset mixing formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .records import describe, field_text, file_kind, records
from .sources import expand_paths

FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt")
IGNORE = -100
# The fields that name each format (all of them, in the first record).
_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",),
           "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n")


@dataclass
class Example:
    """One example's tokens and, per token, what the position before it must predict."""

    ids: np.ndarray       # int32 [L]
    targets: np.ndarray   # int32 [L]: ids where learned, -100 elsewhere (always at 0)
    where: str = ""       # file:line, for messages
    answers: np.ndarray | None = None  # the answers-only targets (validation), when different

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def learned(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def answer_targets(self) -> np.ndarray:
        """What validation scores: the answers only, whatever training learns."""
        return self.targets if self.answers is None else self.answers


# --- reading records -------------------------------------------------------------------------

def detect(record, where: str) -> str | None:
    """The format a record's fields name; None for anything else (raw text)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    for fmt, fields in _FIELDS.items():
        if all(f in record for f in fields):
            return fmt
    return None


def data_files(path: str | os.PathLike) -> list[Path]:
    """The record files (.jsonl [compressed], .json, .parquet) that ``path`` names."""
    return [p for p in expand_paths(path)
            if p.suffix.lower() in (".jsonl", ".json", ".parquet") or
            file_kind(p)[0] == "jsonl"]


def dataset_format(path: str | os.PathLike, named: str = "auto") -> str:
    """``text`` or one of :data:`FORMATS`: ``named``, else what the first record says."""
    if named != "auto":
        return named
    files = data_files(path)
    if not files:
        return "text"
    first = next(records(files[0]), None)
    return (detect(*first) or "text") if first else "text"


# --- records -> messages or prompt/completion -------------------------------------------------

def parse_messages(items, where: str, field: str, role_key: str = "role",
                   content_key: str = "content", roles: dict | None = None) -> list[dict]:
    """A list of chat messages, checked (roles, text), as ``{"role", "content"}`` dicts."""
    if not isinstance(items, list) or not items:
        raise UserError(f'{where}: "{field}" must be a non-empty list of messages')
    out = []
    for n, m in enumerate(items, 1):
        if not isinstance(m, dict):
            raise UserError(f'{where}: message {n} of "{field}" is not an object')
        given, content = m.get(role_key), m.get(content_key)
        known = roles or {r: r for r in ("system", "user", "assistant")}
        role = known.get(given) if isinstance(given, str) else None
        if role is None:
            raise UserError(f"{where}: message {n} has role {describe(given)}; expected one of "
                            f"{', '.join(map(repr, known))}")
        if not isinstance(content, str):
            raise UserError(f'{where}: message {n} has no text "{content_key}"')
        out.append({"role": role, "content": content})
    return out


def _as_chat_or_pair(record: dict, fmt: str, where: str):
    """A chat (list of messages) or a (prompt, completion) pair of strings."""
    if fmt == "messages":
        return parse_messages(record.get("messages"), where, "messages")
    if fmt == "sharegpt":
        return parse_messages(record.get("conversations"), where, "conversations", "from",
                              "value", _SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction, extra = field_text(record, "instruction", where), \
            field_text(record, "input", where, optional=True)
        prompt = ALPACA_INPUT.format(instruction=instruction, input=extra) if extra else \
            ALPACA.format(instruction=instruction)
        return prompt, field_text(record, "output", where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
        return parse_messages(prompt, where, "prompt") + \
            parse_messages(completion, where, "completion")
    return field_text(record, "prompt", where), field_text(record, "completion", where)


# --- -> tokens ----------------------------------------------------------------------------------

def encode_example(item, encoder, template, train_on_prompt: bool, where: str) -> Example:
    """Tokens of a chat (through ``template``) or a (prompt, completion) pair."""
    eot = encoder.eot_token
    if isinstance(item, tuple):
        prompt, completion = (encoder.encode_ordinary(t) for t in item)
        ids = prompt + completion + [eot]
        answer = [False] * len(prompt) + [True] * (len(completion) + 1)
    else:
        if item[-1]["role"] != "assistant" and not train_on_prompt:
            raise UserError(f"{where}: the conversation ends with a {item[-1]['role']} turn, not "
                            "the assistant's: nothing to learn from its end")
        ids, answer = template.encode(item, encoder)
    ids = np.asarray(ids, dtype=np.int32)
    answers = np.where(answer, ids, IGNORE).astype(np.int32)
    answers[0] = IGNORE  # nothing precedes an example's first token
    if not train_on_prompt:
        return Example(ids, answers, where)
    targets = ids.copy()
    targets[0] = IGNORE
    return Example(ids, targets, where, answers)


@dataclass
class ExampleSet:
    """A dataset's examples, and what fitting them into n_ctx did to them."""

    examples: list[Example]
    fmt: str
    chats: bool = False      # rendered through the chat template
    truncated: int = 0       # lost the start of their prompt
    dropped: int = 0         # --drop_long
    nothing_learned: int = 0

    def with_items(self, examples: list[Example]) -> ExampleSet:
        """A set of the same format holding ``examples`` (a split of this one)."""
        return ExampleSet(examples, self.fmt, self.chats)

    def describe(self, name: str) -> str:
        tokens = sum(len(e) for e in self.examples)
        learned = sum(e.learned for e in self.examples)
        line = (f"{name}: {len(self.examples):,} {self.fmt} examples, {tokens:,} tokens, "
                f"{learned:,} of them learned")
        if self.truncated:
            line += (f"; {self.truncated:,} longer than n_ctx lost the start of their prompt "
                     "(--drop_long drops them)")
        if self.dropped:
            line += f"; {self.dropped:,} longer than n_ctx dropped (--drop_long)"
        if self.nothing_learned:
            line += f"; {self.nothing_learned:,} with nothing to learn skipped"
        return line


def fit(example: Example, n_ctx: int) -> Example:
    """An example longer than n_ctx keeps its end (the answer) and loses its start."""
    def cut(targets):
        if targets is None:
            return None
        out = targets[-n_ctx:].copy()
        out[0] = IGNORE
        return out

    return Example(example.ids[-n_ctx:].copy(), cut(example.targets), example.where,
                   cut(example.answers))


def load_examples(path: str | os.PathLike, encoder, template, *, n_ctx: int, fmt: str = "auto",
                  train_on_prompt: bool = False, drop_long: bool = False) -> ExampleSet:
    """Every example of the dataset at ``path``, tokenized and fitted into ``n_ctx``."""
    from tqdm import tqdm

    files = data_files(path)
    if not files:
        raise UserError(f"{path}: no .jsonl, .json or .parquet files of examples")
    fmt = dataset_format(path, fmt)
    if fmt == "text":
        raise UserError(f"{path}: its records are not examples (fields prompt/completion, "
                        "messages, instruction/output or conversations); train on it as text")
    out = ExampleSet([], fmt)
    for file in files:
        for record, where in tqdm(records(file), desc=f"tokenizing {file.name}", unit=" ex",
                                  disable=None, leave=False):
            found = detect(record, where)
            if found != fmt:
                raise UserError(f"{where}: a {found or 'text'} record in a {fmt} dataset (one "
                                "format per dataset; --data_format names it)")
            item = _as_chat_or_pair(record, fmt, where)
            out.chats = out.chats or isinstance(item, list)
            example = encode_example(item, encoder, template, train_on_prompt, where)
            if len(example) > n_ctx:
                if drop_long:
                    out.dropped += 1
                    continue
                example, out.truncated = fit(example, n_ctx), out.truncated + 1
            if not example.learned:
                out.nothing_learned += 1
                continue
            out.examples.append(example)
    if not out.examples:
        raise UserError(f"{path}: no example left to learn from")
    return out

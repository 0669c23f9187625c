"""Prompt records for learning from rewards (GRPO): a prompt to answer, and the record's other
fields, which reward functions read (the expected answer, tests to run, a format).

    prompts = load_prompts("math.jsonl", encoder, template, room=960)
    p = prompts.prompts[0]
    p.ids, p.prompt, p.fields        # token ids, the prompt as given, {"answer": "42", ...}

A record is ``{"prompt": str, ...}`` (the text the model continues) or ``{"prompt": [messages],
...}`` (rendered through the chat template with the assistant's opening), as TRL's GRPOTrainer
reads them. A prompt longer than ``room`` tokens keeps its end. Files as
:mod:`gpt2.data.records` reads them; a bad record is one line naming file:line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .examples import data_files, parse_messages
from .records import describe, records


@dataclass
class Prompt:
    ids: np.ndarray            # int32
    prompt: str | list[dict]   # as the record gave it (reward functions receive it)
    fields: dict = field(default_factory=dict)  # the record's other fields
    where: str = ""

    def __len__(self) -> int:
        return 1  # one prompt a row: its completions are what is batched


@dataclass
class PromptSet:
    prompts: list[Prompt]
    chats: bool = False
    cut: int = 0

    @property
    def examples(self) -> list[Prompt]:  # what training draws (as an ExampleSet's)
        return self.prompts

    def with_items(self, prompts: list[Prompt]) -> PromptSet:
        return PromptSet(prompts, self.chats)

    def describe(self, name: str) -> str:
        line = f"{name}: {len(self.prompts):,} prompts"
        if self.cut:
            line += f"; {self.cut:,} lost their start to leave room for the completions"
        return line


def encode_prompt(prompt, encoder, template, where: str) -> np.ndarray:
    if isinstance(prompt, str):
        ids = encoder.encode_ordinary(prompt)
    else:
        ids = template.encode(prompt, encoder, add_generation_prompt=True)[0]
    if not ids:
        raise UserError(f"{where}: the prompt is empty")
    return np.asarray(ids, np.int32)


def load_prompts(path: str | os.PathLike, encoder, template, *, room: int) -> PromptSet:
    """Every prompt of the dataset at ``path``, tokenized, at most ``room`` tokens each."""
    files = data_files(path)
    if not files:
        raise UserError(f"{path}: no .jsonl, .json or .parquet files of prompts")
    out = PromptSet([])
    for file in files:
        for record, where in records(file):
            if not isinstance(record, dict) or "prompt" not in record:
                raise UserError(f'{where}: a record needs a "prompt" field (got '
                                f"{describe(record)})")
            prompt = record["prompt"]
            if isinstance(prompt, list):
                prompt = parse_messages(prompt, where, "prompt")
                out.chats = True
            elif not isinstance(prompt, str):
                raise UserError(f'{where}: "prompt" must be a string or a list of messages')
            ids = encode_prompt(prompt, encoder, template, where)
            if len(ids) > room:
                ids, out.cut = ids[-room:].copy(), out.cut + 1
            out.prompts.append(Prompt(ids, prompt, {k: v for k, v in record.items()
                                                    if k != "prompt"}, where))
    if not out.prompts:
        raise UserError(f"{path}: no prompt to learn from")
    return out

"""A chat with a model: messages in, the assistant's reply out, the way every chat tool here
does it (``gpt2 chat``, ``gpt2 generate --chat``, the server's ``/v1/chat/completions``).

    template = ChatTemplate.for_model(model_dir)
    ids, dropped = prompt_ids(template, enc, messages, n_ctx, max_new=200)
    text, reason = reply(model, enc, ids, 200, temperature=0.7, top_k=40, on_text=print)

The prompt is the conversation rendered by the model's chat template with the generation prompt
after it; the reply is sampled until the model writes ``<|endoftext|>`` (how the default
template ends a turn) or ``max_new`` tokens. A conversation longer than the model's context
loses its oldest turns (the system message stays) and says how many.
"""

from __future__ import annotations

import codecs
from typing import Callable

import torch

from .errors import UserError
from .sampling import decode


class ContextTooLong(UserError):
    """The conversation's newest message does not fit the model's context."""


def prompt_ids(template, encoder, messages: list[dict], n_ctx: int, max_new: int
               ) -> tuple[list[int], int]:
    """The rendered prompt's ids, and how many of the oldest turns were dropped to fit
    ``n_ctx`` with room for ``max_new`` new tokens (the last is never fed back)."""
    room = n_ctx + 1 - max_new
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids, _ = template.encode(system + turns[dropped:], encoder, add_generation_prompt=True)
        if len(ids) <= room:
            return ids, dropped
        if dropped >= len(turns) - 1:  # the newest message alone does not fit
            raise ContextTooLong(f"the conversation's last message needs {len(ids)} tokens, but "
                            f"{room} fit with {max_new} new ones in n_ctx {n_ctx}")
        dropped += 1
        while dropped < len(turns) - 1 and turns[dropped]["role"] != "user":
            dropped += 1  # the kept history starts with a user's turn


def reply(model: torch.nn.Module, encoder, ids: list[int], max_new: int,
          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          generator: torch.Generator | None = None,
          on_text: Callable[[str], None] | None = None) -> tuple[str, str]:
    """The reply to a prompt, and why it ended: ``stop`` (``<|endoftext|>``) or ``length``.
    ``on_text`` receives the text as it comes (whole characters only)."""
    eot = encoder.eot_token
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []

    def finished(row: int, new: list[int]) -> bool:
        if new[-1] == eot:
            return True
        piece = utf8.decode(encoder.decode_bytes(new[-1:]))
        if piece:
            parts.append(piece)
            if on_text is not None:
                on_text(piece)
        return False

    device = next(model.parameters()).device
    context = torch.tensor([ids], dtype=torch.long, device=device)
    new = decode(model, context, max_new, temperature, top_k, top_p, generator, finished)[0]
    tail = utf8.decode(b"", final=True)
    if tail:
        parts.append(tail)
        if on_text is not None:
            on_text(tail)
    return "".join(parts), "stop" if new and new[-1] == eot else "length"

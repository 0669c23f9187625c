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
    ``n_ctx`` with room for ``max_new`` new tokens (the last is never fed back).

    The kept history starts with a user's turn (or is the newest message alone); the fewest
    turns are dropped, found by bisection: a few renders whatever the history's length."""
    room = n_ctx + 1 - max_new
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    starts = [0] + [i for i in range(1, len(turns)) if turns[i]["role"] == "user"]
    if len(turns) > 1 and starts[-1] != len(turns) - 1:
        starts.append(len(turns) - 1)
    rendered: dict[int, list[int]] = {}

    def ids(k: int) -> list[int]:  # the prompt without the oldest starts[k] turns
        if k not in rendered:
            rendered[k] = template.encode(system + turns[starts[k]:], encoder,
                                          add_generation_prompt=True)[0]
        return rendered[k]

    if len(ids(0)) <= room:
        return ids(0), 0
    last = len(starts) - 1
    if len(ids(last)) > room:  # the newest message alone does not fit
        raise ContextTooLong(f"the conversation's last message needs {len(ids(last))} tokens, "
                             f"but {room} fit with {max_new} new ones in n_ctx {n_ctx}")
    low, high = 0, last  # ids(low) does not fit, ids(high) does
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(ids(mid)) > room else (low, mid)
    return ids(high), starts[high]


def reply(model: torch.nn.Module, encoder, ids: list[int], max_new: int,
          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          generator: torch.Generator | None = None,
          on_text: Callable[[str], None] | None = None, speculator=None) -> tuple[str, str]:
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
    new = decode(model, context, max_new, temperature, top_k, top_p, generator, finished,
                 speculator=speculator)[0]
    tail = utf8.decode(b"", final=True)
    if tail:
        parts.append(tail)
        if on_text is not None:
            on_text(tail)
    return "".join(parts), "stop" if new and new[-1] == eot else "length"

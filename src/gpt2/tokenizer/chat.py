"""Chat templates as Hugging Face defines them: a Jinja template that turns a list of messages
into the text a model reads, rendered in Jinja's sandbox.

    template = ChatTemplate.load("checkpoint/run1")         # chat_template.jinja, or ours
    ids, mask = template.encode(messages, encoder)          # mask: the tokens a model learns
    prompt = template.encode(messages, encoder, add_generation_prompt=True)[0]

GPT-2 has no chat tokens, so :data:`DEFAULT_TEMPLATE` adds none: the vocabulary, the released
weights and every export keep working. A conversation reads::

    You are terse.                      <- a system message, then a blank line
    <BLANKLINE>
    User: What is 2+2?
    Assistant: 4<|endoftext|>
    User: ...

and each assistant turn ends with ``<|endoftext|>``, so a model learns where its answer stops
and a decoder stops there. The parts a model is trained on are marked in the template with
``{% generation %}...{% endgeneration %}`` (transformers' own marker, so its
``return_assistant_tokens_mask`` finds the same tokens). A template without the marker still
works: the assistant turns are found by rendering the conversation up to each of them.

A template comes from a model directory that may have been downloaded: it is rendered in Jinja's
immutable sandbox with no loader (no ``include``/``import``, no files, no attributes beginning
with ``_``), with the globals transformers gives templates (``raise_exception``, ``strftime_now``,
``tojson``). A template that fails is one line naming it.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

from ..errors import UserError
from ..io.atomic import write_text

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{{ message['content'] + '\\n\\n' }}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{ 'User: ' + message['content'] + '\\n' }}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + '<|endoftext|>' }}"
    "{% endgeneration %}{{ '\\n' }}\n"
    "{%- else -%}\n"
    "{{ raise_exception('unknown role ' + message['role'] + ': the default template knows "
    "system, user and assistant') }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}\n")

# Private-use characters that bracket {% generation %} output while rendering: found, removed,
# and their places kept as the assistant spans.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: what the model writes, bracketed."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

        def _bracket(self, caller) -> str:
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class ChatTemplate:
    """A chat template's source, compiled once; ``name`` is where it came from (for errors)."""

    def __init__(self, source: str, name: str = "the default chat template"):
        self.source, self.name = source, name
        self.marked = "generation" in source and "endgeneration" in source

    @functools.cached_property
    def compiled(self):
        """The template, compiled in the sandbox on first use (so that raw-text training never
        needs jinja2); a syntax error is one line naming the template."""
        environment = _environment()
        import jinja2

        try:
            return environment.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.name}: line {e.lineno}: {e.message}") from None

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_TEMPLATE)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ChatTemplate:
        path = Path(path)
        try:
            return cls(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: no such chat template file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None

    @classmethod
    def load(cls, model_dir: str | os.PathLike | None) -> ChatTemplate:
        """The model directory's ``chat_template.jinja`` (a run directory: its newest
        checkpoint's), else :data:`DEFAULT_TEMPLATE`."""
        if model_dir is not None:
            from ..io.paths import follow_run_dir

            path = follow_run_dir(Path(model_dir)) / TEMPLATE_FILE
            if path.is_file():
                return cls.from_file(path)
        return cls.default()

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write it as ``chat_template.jinja`` (transformers reads the same file)."""
        return write_text(Path(model_dir) / TEMPLATE_FILE, self.source)

    @functools.cached_property
    def reply_prefix(self) -> str:
        """What the template writes between the generation prompt and an assistant's content
        (gpt2's: one space, as in "Assistant: 4"): a reply starts with it, the content after."""
        probe = "\ue010"
        text, spans = self.render([{"role": "user", "content": "x"},
                                   {"role": "assistant", "content": probe}])
        turn = text[spans[-1][0]:spans[-1][1]] if spans else ""
        return turn[:turn.find(probe)] if probe in turn else ""

    def content_of(self, reply: str) -> str:
        """A generated reply as a message's content (without :attr:`reply_prefix`)."""
        prefix = self.reply_prefix
        return reply[len(prefix):] if prefix and reply.startswith(prefix) else reply

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        template = self.compiled
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # raise_exception(), a sandbox refusal
            raise UserError(f"{self.name}: {e}") from None
        except Exception as e:  # the template's own bug (its code is not ours): one line too
            raise UserError(f"{self.name}: {type(e).__name__}: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False
               ) -> tuple[str, list[tuple[int, int]]]:
        """The text, and the character spans of the assistant turns in it (what is learned)."""
        if any(_OPEN in m.get("content", "") or _CLOSE in m.get("content", "")
               for m in messages):
            raise UserError("a message holds U+E000/U+E001, which chat templates reserve")
        raw = self._render(messages, add_generation_prompt)
        if self.marked:
            return _unbracket(raw)
        return raw, self._spans_by_prefix(messages, raw)

    def _spans_by_prefix(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Without {% generation %}: assistant turn k is what rendering messages[:k + 1] adds
        to rendering messages[:k] with the generation prompt."""
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._render(messages[:k], True)
            upto = self._render(messages[:k + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError(f"{self.name}: cannot tell where assistant turn {k + 1} starts "
                                "(rendering the conversation turn by turn does not give "
                                "prefixes of it); mark it with {% generation %}")
            spans.append((len(before), len(upto)))
        return spans

    def encode(self, messages: list[dict], encoder, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation, and for each whether it is in an assistant
        turn (a token overlapping a turn counts, as transformers counts it)."""
        text, spans = self.render(messages, add_generation_prompt)
        ids = encoder.encode(text)
        return ids, token_mask(text, spans, ids, encoder)


def _unbracket(raw: str) -> tuple[str, list[tuple[int, int]]]:
    out, spans, start, pos = [], [], None, 0
    for i, ch in enumerate(raw):
        if ch == _OPEN:
            start = pos
        elif ch == _CLOSE:
            spans.append((start, pos))
        else:
            out.append(ch)
            pos += 1
    return "".join(out), [(a, b) for a, b in spans if b > a]


def token_mask(text: str, spans: list[tuple[int, int]], ids: list[int], encoder) -> list[bool]:
    """For each token of ``text`` (``ids``), whether its bytes overlap a character span."""
    edges = []
    for a, b in spans:  # character spans -> byte spans
        edges.append((len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))))
    mask, offset, k = [], 0, 0
    for i in ids:
        end = offset + len(encoder.decode_bytes([i]))
        while k < len(edges) and edges[k][1] <= offset:
            k += 1
        mask.append(k < len(edges) and edges[k][0] < end and offset < edges[k][1])
        offset = end
    return mask

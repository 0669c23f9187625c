"""Chat templates as Hugging Face defines them: a Jinja template that turns a list of messages
into the text a model reads, rendered in a bounded sandbox (:mod:`.sandbox`).

    template = ChatTemplate.for_model("checkpoint/run1")    # chat_template.jinja, or ours
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

**Content is text.** Only what the template itself writes can be a special token: a message
holding the literal text ``<|endoftext|>`` (or any other character) is encoded as ordinary
text, inside its turn, so a user cannot end their turn and write the assistant's, and a
dataset's text cannot cut an answer short. (tiktoken refuses special tokens in text unless
they are allowed; :meth:`ChatTemplate.encode` allows them exactly where the template put them.)

A template comes from a model directory that may have been downloaded: it is rendered in Jinja's
immutable sandbox with no loader (no ``include``/``import``, no files, no attributes beginning
with ``_``), bounded in time, output and arithmetic, with the globals transformers gives
templates (``raise_exception``, ``strftime_now``, ``tojson``). A template that fails or goes over
a bound is one line naming it.
"""

from __future__ import annotations

import bisect
import contextvars
import functools
import json
import os
from datetime import datetime
from pathlib import Path

from ..errors import UserError
from ..files.atomic import write_text
from ..files.paths import follow_run_dir
from .bpe import EOT

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
MAX_SOURCE = 1 << 20  # characters of a template's source

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

# Three characters no message of the conversation holds, chosen per render from the private
# use area: where {% generation %} output opens and closes, and what stands for a literal
# <|endoftext|> of a message while the template runs (so that it is known to be text).
_markers: contextvars.ContextVar[str] = contextvars.ContextVar("gpt2_chat_markers",
                                                               default="\ue000\ue001\ue002")


def _free_markers(messages: list[dict], source: str) -> str:
    used = set(source)
    for m in messages:
        used.update(str(m.get("content", "")))
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
    try:
        return next(free) + next(free) + next(free)
    except StopIteration:
        raise UserError("a conversation that holds every private-use character cannot be "
                        "rendered") from None


@functools.lru_cache(maxsize=1)
def _environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
    except ImportError:
        raise UserError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None
    from .sandbox import BoundedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: what the model writes, bracketed."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

        def _bracket(self, caller) -> str:
            markers = _markers.get()
            return markers[0] + caller() + markers[1]

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.check_callables()
    return env


class ChatTemplate:
    """A chat template's source, compiled once; ``name`` is where it came from (for errors)."""

    def __init__(self, source: str, name: str = "the default chat template"):
        if len(source) > MAX_SOURCE:
            raise UserError(f"{name}: a chat template of {len(source):,} characters; more than "
                            f"{MAX_SOURCE:,} is not one")
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
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise UserError(f"{self.name}: {e or type(e).__name__}") from None

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_TEMPLATE)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ChatTemplate:
        path = Path(path)
        try:
            if path.stat().st_size > 4 * MAX_SOURCE:
                raise UserError(f"{path}: {path.stat().st_size:,} bytes is not a chat template")
            return cls(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: no such chat template file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: a directory, not a chat template file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None

    @classmethod
    def saved(cls, model_dir: str | os.PathLike) -> ChatTemplate | None:
        """The model directory's own ``chat_template.jinja`` (a run directory: its newest
        checkpoint's), or None."""
        path = follow_run_dir(Path(model_dir)) / TEMPLATE_FILE
        return cls.from_file(path) if path.is_file() else None

    @classmethod
    def load(cls, model_dir: str | os.PathLike | None) -> ChatTemplate:
        """The model directory's ``chat_template.jinja``, else :data:`DEFAULT_TEMPLATE`."""
        return (cls.saved(model_dir) if model_dir is not None else None) or cls.default()

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike | None,
                  file: str | os.PathLike | None = None, check: bool = True) -> ChatTemplate:
        """The template every command uses for a model: ``file`` (``--chat_template``) if
        given, else the model directory's, else gpt2's own; ``check``: compiled now, so that a
        broken one is one line before any work starts."""
        template = cls.from_file(file) if file is not None else cls.load(model_dir)
        if check:
            template.compiled
        return template

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write it as ``chat_template.jinja`` (transformers reads the same file)."""
        return write_text(Path(model_dir) / TEMPLATE_FILE, self.source)

    @property
    def unmarked_source(self) -> str:
        """The source without ``{% generation %}`` markers (engines that do not train, such as
        llama.cpp, do not know the tag; it renders nothing)."""
        import re

        return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", self.source)

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

    # -- rendering -----------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        from .sandbox import render

        template = self.compiled
        try:
            return render(template, messages=messages,
                          add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # raise_exception(), a sandbox refusal, a bound
            raise UserError(f"{self.name}: {e}") from None
        except Exception as e:  # the template's own bug (its code is not ours): one line too
            raise UserError(f"{self.name}: {type(e).__name__}: {e}") from None

    def _rendered(self, messages: list[dict], add_generation_prompt: bool
                  ) -> tuple[str, list[tuple[int, int]], str]:
        """The text with each message's literal <|endoftext|> as a stand-in character, the
        character spans of the assistant turns in it, and the stand-in."""
        for i, m in enumerate(messages, 1):
            content = m.get("content")
            if isinstance(content, str) and not content.isascii():
                try:
                    content.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UserError(f"message {i} holds a lone surrogate "
                                    f"(\\u{ord(content[e.start]):04x}), which is not text") \
                        from None
        markers = _free_markers(messages, self.source)
        stand_in = markers[2]
        text_messages = [{**m, "content": m["content"].replace(EOT, stand_in)}
                         if isinstance(m.get("content"), str) else m for m in messages]
        token = _markers.set(markers)
        try:
            raw = self._render(text_messages, add_generation_prompt)
            if self.marked:
                return (*_unbracket(raw, markers[0], markers[1]), stand_in)
            return raw, self._spans_by_prefix(text_messages, raw), stand_in
        finally:
            _markers.reset(token)

    def render(self, messages: list[dict], add_generation_prompt: bool = False
               ) -> tuple[str, list[tuple[int, int]]]:
        """The text, and the character spans of the assistant turns in it (what is learned)."""
        return _restore(*self._rendered(messages, add_generation_prompt))

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
        turn (a token overlapping a turn counts, as transformers counts it). The template's own
        ``<|endoftext|>`` is the special token; a message's is text (see the module
        docstring)."""
        text, spans, stand_in = self._rendered(messages, add_generation_prompt)
        specials = encoder.eot_token is not None
        pieces = text.split(EOT) if specials else [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(encoder.eot_token)
            ids += encoder.encode_ordinary(piece.replace(stand_in, EOT)) if piece else []
        text, spans = _restore(text, spans, stand_in)
        if not ids:
            raise UserError(f"{self.name}: renders this conversation as no tokens at all")
        return ids, token_mask(text, spans, ids, encoder)


def _unbracket(raw: str, open_: str, close: str) -> tuple[str, list[tuple[int, int]]]:
    out, spans, start, pos = [], [], None, 0
    for ch in raw:
        if ch == open_:
            start = pos
        elif ch == close:
            spans.append((start, pos))
        else:
            out.append(ch)
            pos += 1
    return "".join(out), [(a, b) for a, b in spans if a is not None and b > a]


def _restore(text: str, spans: list[tuple[int, int]], stand_in: str
             ) -> tuple[str, list[tuple[int, int]]]:
    """The text with each stand-in back as the literal <|endoftext|>, and the spans moved."""
    if stand_in not in text:
        return text, spans
    at = [i for i, ch in enumerate(text) if ch == stand_in]
    grow = len(EOT) - 1

    def moved(i: int) -> int:
        return i + grow * bisect.bisect_left(at, i)

    return text.replace(stand_in, EOT), [(moved(a), moved(b)) for a, b in spans]


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

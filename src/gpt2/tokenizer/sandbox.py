"""Rendering a Jinja template that came with a downloaded model, without letting it take the
process down: the one renderer of chat templates (``gpt2 chat``, ``generate --chat``, the
server, training on chats, the harness backend).

    environment = bounded_environment(extensions=[...])
    text = render(environment.from_string(source), name="chat_template.jinja", messages=...)

Jinja's immutable sandbox already refuses files, imports, attributes beginning with ``_`` and
mutating what the template is given. What it does not bound, this does:

- **time**: a render that runs longer than :data:`LIMITS`' ``seconds`` is stopped (a trace
  function checks the clock as the template's code runs: loops of ``range(10**5)`` inside each
  other end in a second, not in hours);
- **arithmetic**: ``**``, ``*``, ``+`` and ``%`` refuse results larger than ``int_bits`` bits
  (``9**(9**9)`` would take hours in one C call, and is refused before it starts, also when
  Jinja would fold the constant while compiling) or, for text and lists, ``chars`` characters
  and items, nested ones counted (``'a' * 10**8``);
- **calls**: a number given to a filter, test, global or method past ``argument`` (a width
  or a count: ``'a'.ljust(10**9)``, ``tojson(indent=10**10)``) is refused before the call
  makes its result;
- **output**: everything a render writes (its text, blocks it captures, ``~`` joins, filter
  results) is counted, and a render that produces more than ``chars`` characters in all stops.

A template over a bound raises :class:`TemplateLimit`, a ``jinja2.TemplateError`` that the chat
template turns into one line naming the template.
"""

from __future__ import annotations

import contextvars
import functools
import re
import sys
import time
from dataclasses import dataclass

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class Limits:
    seconds: float = 2.0        # wall time of one render
    chars: int = 4 << 20        # characters one render may produce, in all
    int_bits: int = 4096        # the largest integer arithmetic may make
    argument: int = 1 << 16     # the largest number a call may be given (a width, a count)


LIMITS = Limits()


class TemplateLimit(jinja2.TemplateError):
    """A render went over one of :data:`LIMITS`."""


@dataclass
class _Budget:
    deadline: float
    chars: int
    events: int = 0


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("gpt2_template_budget",
                                                                         default=None)


def _spend(chars: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.chars -= chars
        if budget.chars < 0:
            raise TemplateLimit(f"the template produces more than {LIMITS.chars:,} characters")


def _size(value, seen: dict | None = None) -> int:
    """Characters and items a value holds: a string's length; a list's, tuple's or dict's
    items and what they hold, nested ones included (a list repeating one big list counts it
    every time: that is what printing it costs)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 0
    seen = {} if seen is None else seen
    if id(value) not in seen:
        seen[id(value)] = 0  # (a list inside itself counts once)
        items = list(value.items()) if isinstance(value, dict) else value
        seen[id(value)] = len(items) + sum(_size(v, seen) for v in items)
    return seen[id(value)]


def _checked(value):
    """``value``, unless it is text (or a list of it) larger than the limit."""
    if _size(value) > LIMITS.chars:
        raise TemplateLimit(f"the template makes a value of more than {LIMITS.chars:,} "
                            "characters")
    return value


class _Buffer(list):
    """What a block, macro or ``{% generation %}`` writes, counted as it is written."""

    def append(self, piece) -> None:
        _spend(_size(piece))
        super().append(piece)

    def extend(self, pieces) -> None:
        pieces = list(pieces)
        _spend(sum(_size(p) for p in pieces))
        super().extend(pieces)


class _Generator(CodeGenerator):
    """Jinja's code generator, with counted buffers and ``~`` joins through the environment."""

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.join_checked((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{6,})|\{[^}]*?(?:\d{6,}|\{)")


def _int_bits(value) -> int:
    return value.bit_length() if isinstance(value, int) and not isinstance(value, bool) else 0


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with :data:`LIMITS` on arithmetic and on what a render writes."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.concat = self.join_checked
        self.check_callables()

    def check_callables(self) -> None:
        """Wrap every filter, test and global in the checks (call again after adding some)."""
        for table, first in ((self.filters, 1), (self.tests, 1), (self.globals, 0)):
            for name, value in list(table.items()):
                if callable(value) and not getattr(value, "checked", False) and \
                        not isinstance(value, type):
                    table[name] = _checking(value, first)

    @staticmethod
    def new_buffer() -> _Buffer:
        return _Buffer()

    @staticmethod
    def join_checked(pieces) -> str:
        out, size = [], 0
        for piece in pieces:
            piece = piece if isinstance(piece, str) else str(piece)
            size += len(piece)
            if size > LIMITS.chars:
                raise TemplateLimit(f"the template makes a text of more than {LIMITS.chars:,} "
                                    "characters")
            out.append(piece)
        return "".join(out)

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and isinstance(right, int) and _int_bits(left) > 1 and right > 0:
            if right * _int_bits(left) > LIMITS.int_bits:
                raise TemplateLimit(f"{left} ** {right} is larger than {LIMITS.int_bits} bits")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0 \
                        and _size(seq) * n > LIMITS.chars:
                    raise TemplateLimit(f"repeating a value {n:,} times makes more than "
                                        f"{LIMITS.chars:,} characters")
            if _int_bits(left) + _int_bits(right) > LIMITS.int_bits:
                raise TemplateLimit(f"a product larger than {LIMITS.int_bits} bits")
        elif operator == "+" and _size(left) + _size(right) > LIMITS.chars:
            raise TemplateLimit(f"a sum of more than {LIMITS.chars:,} characters")
        elif operator == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
            raise TemplateLimit("a format with a computed or very large width")
        return _checked(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        if isinstance(getattr(value, "__self__", None), str) and \
                getattr(value, "__name__", None) in ("format", "format_map") and \
                _FORMAT_WIDTH.search(value.__self__):
            raise TemplateLimit("a format with a computed or very large width")
        return super().wrap_str_format(value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (as jinja's own)
        _check_arguments(getattr(__obj, "__name__", "a call"), args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))


def _check_arguments(name: str, args, kwargs) -> None:
    """Numbers a call is given are widths and counts: past :data:`LIMITS`' ``argument`` they
    would make the result (``'a'.ljust(10**9)``, ``tojson(indent=10**10)``) before any check
    of it could run."""
    for value in list(args) + list(kwargs.values()):
        if _int_bits(value) and abs(value) > LIMITS.argument:
            raise TemplateLimit(f"{name.removeprefix('do_')} given {value:,}: more than "
                                f"{LIMITS.argument:,}")


def _checking(func, first: int):
    """A filter, test or global whose numbers are checked (from argument ``first``: a filter's
    value is its own) and whose result is checked against the limits; the attributes Jinja
    reads to pass it the context are kept."""

    @functools.wraps(func)
    def checked(*args, **kwargs):
        _check_arguments(func.__name__, args[first:], kwargs)
        return _checked(func(*args, **kwargs))

    checked.checked = True
    return checked


def _tracer(budget: _Budget):
    """The trace function that stops a render past its deadline (checked every 64 events of
    the template's own code and on every call it makes)."""

    def trace(frame, event, arg):
        budget.events += 1
        if event == "call" or budget.events & 63 == 0:
            if time.monotonic() > budget.deadline:
                raise TemplateLimit(f"rendering takes longer than {LIMITS.seconds:g} s")
        return trace if frame.f_code.co_filename == "<template>" else None

    return trace


def render(template, **variables) -> str:
    """``template.render(**variables)`` within :data:`LIMITS` (see the module docstring)."""
    budget = _Budget(time.monotonic() + LIMITS.seconds, LIMITS.chars)
    token = _budget.set(budget)
    previous = sys.gettrace()
    sys.settrace(_tracer(budget))
    try:
        return template.render(**variables)
    except RecursionError:
        raise TemplateLimit("the template recurses too deeply") from None
    finally:
        sys.settrace(previous)
        _budget.reset(token)

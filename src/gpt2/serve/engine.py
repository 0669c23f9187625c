"""Continuous batching: every running completion shares one forward pass per step.

    engine = Engine(model, encoder, max_batch=16)
    engine.start()
    choice = Choice(prompt_ids, Params(max_tokens=32), sink=print)
    engine.submit([choice])          # events reach ``sink`` from the engine's thread

One thread owns the model. Between two steps it admits waiting choices (each prompt runs once
to fill its cache, then joins the batch) and drops finished or abandoned ones; each step samples
one token per row, with the row's own settings and random stream, and feeds them back in one
forward. The cache and the model calls are :class:`gpt2.sampling.Decoder` (rows of different
lengths share it left-padded, the padding masked out), sampling is
:func:`gpt2.sampling.next_token`: the loop every command decodes with, scheduled by requests.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels import decode_kernels
from ..capture import capture_enabled, shared_step
from ..decoder import Decoder
from ..sampling import StopStrings, next_token


@dataclass
class Params:
    """One completion's settings (validated by the HTTP layer)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None   # None: none; N: the chosen token's and the top N others'
    echo: bool = False
    seed: int | None = None


class Busy(Exception):
    """The queue is full: try again later (HTTP 429)."""


class Choice:
    """One sequence to generate, and how far it got. ``sink(event)`` is called from the engine
    thread with ``("token", text, logprob entry or None)``, ``("prompt", entries)`` (echo with
    logprobs) and, last, ``("done", finish_reason)`` or ``("error", message)``."""

    def __init__(self, prompt: list[int], params: Params, sink: Callable,
                 generator: torch.Generator | None = None):
        self.prompt, self.params, self.sink = prompt, params, sink
        self.stops = StopStrings(params.stop)
        self.generator = generator
        self.ids: list[int] = []
        self.cancelled = False
        self.finished: str | None = None
        self.sent = 0  # characters of the decoded text already sent


class Engine:
    """The batch, the cache, and the thread that runs them."""

    def __init__(self, model, encoder, max_batch: int = 16, max_queue: int = 256):
        self.model, self.enc = model, encoder
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.n_ctx = model.config.n_ctx
        self.eot = encoder.eot_token
        self.waiting: deque[Choice] = deque()
        self.rows: list[Choice] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gpt2-serve-engine", daemon=True)
        self.decoder: Decoder | None = None  # the rows' cache, in the order of self.rows
        # the captured decode step (gpt2.capture): compiled before the first request is taken
        self.step = shared_step() if capture_enabled() else None

    # -- the outside -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def submit(self, choices: list[Choice]) -> None:
        with self.cond:
            if len(self.waiting) + len(choices) > self.max_queue:
                raise Busy(f"{len(self.waiting)} completions are waiting already")
            self.waiting.extend(choices)
            self.cond.notify()

    @property
    def load(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting)}

    # -- the loop ----------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Compile the captured step for one row and for several (two traces) up front."""
        x = torch.tensor([[self.eot or 0]], device=self.device)
        decoder = Decoder(self.model, x, 2, step=self.step)
        decoder.feed(x[:, 0])
        decoder.join(Decoder(self.model, x, 2))
        decoder.feed(x[:, 0].repeat(2))

    def _run(self) -> None:
        with torch.inference_mode(), decode_kernels(self.model):
            if self.step is not None:
                self._warm_up()
            while True:
                with self.cond:
                    while not (self.rows or self.waiting or self.stopping):
                        self.cond.wait()
                    if self.stopping and not (self.rows or self.waiting):
                        return
                    joining = []
                    while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                        joining.append(self.waiting.popleft())
                try:
                    for choice in joining:
                        self._join(choice)
                    if self.rows:
                        self._step()
                except Exception as e:  # the model failed: tell every waiting client
                    traceback.print_exc()
                    for choice in self.rows + joining:
                        if choice.finished is None:
                            choice.finished = "error"
                            choice.sink(("error", f"{type(e).__name__}: {e}"))
                    self.rows, self.decoder = [], None

    def _step(self) -> None:
        """Sample one token per row, tell each client, drop the finished, feed the rest."""
        tokens = []
        logits = self.decoder.logits[:, :self.enc.n_vocab]  # never an id the tokenizer lacks
        for i, choice in enumerate(self.rows):
            p = choice.params
            token = int(next_token(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                   choice.generator)[0])
            tokens.append(token)
            self._accept(choice, token, logits[i])
        keep = [i for i, c in enumerate(self.rows) if c.finished is None and not c.cancelled]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.decoder = None
            return
        if len(keep) < len(tokens):
            self.decoder.keep(keep)
        self.decoder.feed(torch.tensor([tokens[i] for i in keep], device=self.device))

    # -- one token ---------------------------------------------------------------------------

    def _entry(self, logits: torch.Tensor, token: int, n: int | None) -> dict | None:
        """The chosen token's log-probability and the top N alternatives', as OpenAI's
        (log-softmax of the model's logits: no temperature, no filters)."""
        if n is None:
            return None
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logp, n) if n else None
        return {"token": self.enc.decode([token]), "logprob": float(logp[token]),
                "top": {} if top is None else {
                    self.enc.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}}

    def _accept(self, choice: Choice, token: int, logits: torch.Tensor) -> None:
        p = choice.params
        if token == self.eot:
            choice.finished = "stop"
        else:
            choice.ids.append(token)
        text = self.enc.decode(choice.ids)
        cut = choice.stops.first(text, choice.sent)
        if cut is not None:
            text, choice.finished = text[:cut], "stop"
        elif choice.finished is None and (len(choice.ids) >= p.max_tokens
                                          or len(choice.prompt) + len(choice.ids) > self.n_ctx):
            choice.finished = "length"
        if choice.finished is None:
            text = text[:choice.stops.safe_end(text)]  # hold back a half character or a stop's start
        delta = text[choice.sent:]
        choice.sent = len(text)
        entry = self._entry(logits, token, p.logprobs) if token != self.eot else None
        if delta or entry is not None:
            choice.sink(("token", delta, entry))
        if choice.finished is not None:
            choice.sink(("done", choice.finished))

    # -- the cache ---------------------------------------------------------------------------

    def _join(self, choice: Choice) -> None:
        """Run the prompt once, then make it a row of the batch (or finish it at once)."""
        if choice.cancelled:
            return
        p = choice.params
        x = torch.tensor([choice.prompt], device=self.device)
        want_prompt = p.echo and p.logprobs is not None
        decoder = Decoder(self.model, x, p.max_tokens, prompt_logits=want_prompt,
                          step=self.step)
        if want_prompt:
            logits = decoder.prompt_logits
            entries = [None] + [self._entry(logits[0, t], choice.prompt[t + 1], p.logprobs)
                                for t in range(len(choice.prompt) - 1)]
            choice.sink(("prompt", entries))
        if p.max_tokens == 0:
            choice.finished = "length"
            choice.sink(("done", "length"))
            return
        if self.decoder is None:
            self.decoder = decoder
        else:
            self.decoder.join(decoder)
        self.rows.append(choice)

"""Continuous batching: every running completion shares one forward pass per step.

    engine = Engine(model, encoder, max_batch=16)
    engine.start()                   # or engine.warm_up(); engine.run(): in this thread
    choice = Choice(prompt_ids, Params(max_tokens=32), sink=print)
    engine.submit([choice])          # events reach ``sink`` from the engine's thread

One thread owns the model: ``gpt2 serve`` runs it in its main thread, the one that loaded the
model, and the HTTP server beside it. (A second thread computing after the first one did holds
a second OpenMP thread pool: with more pool threads than cores, libgomp stops spinning between
parallel regions and each wakes through the kernel, ~30% of a batch-1 token on 2 cores.)

Between two steps the loop admits waiting choices (each prompt runs once to fill its cache,
then joins the batch) and drops finished or abandoned ones; each step samples one token per
row, with the row's own settings and random stream, and feeds them back in one forward. The cache and the model calls are :class:`gpt2.sampling.Decoder` (rows of different
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
from ..sampling import StopStrings, draw, next_token
from ..speculative import DraftModel, PromptLookup, accept, token_probs


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
        self.chosen: int | None = None  # the next token, where checking guesses chose it
        self.cancelled = False
        self.finished: str | None = None
        self.sent = 0  # characters of the decoded text already sent


def _fail(choices: list[Choice], reason: str) -> None:
    for choice in choices:
        if choice.finished is None:
            choice.finished = "error"
            try:
                choice.sink(("error", reason))
            except Exception:  # noqa: BLE001 (a client's own trouble must not stop the others)
                pass


class Engine:
    """The batch, the cache, and the thread that runs them."""

    def __init__(self, model, encoder, max_batch: int = 16, max_queue: int = 256,
                 speculator: PromptLookup | DraftModel | None = None):
        self.model, self.enc = model, encoder
        # guessed tokens (speculative decoding), checked for all rows in one forward; a draft
        # model keeps its own cache of the same rows
        self.speculator = speculator
        self.draft: Decoder | None = None
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
        """Compile the captured step (where it is on), then take requests on a thread of the
        engine's own."""
        self.warm_up()
        self.thread.start()

    def warm_up(self) -> None:
        """Compile the captured step, where it is on (before the first request is taken)."""
        if self.step is not None:
            with torch.inference_mode(), decode_kernels(self.model):
                self._warm_up()

    def run(self) -> None:
        """Take requests in the calling thread until :meth:`stop` (called from another) and
        the running ones have finished."""
        self._run()

    def stop(self) -> None:
        """Take no more requests; the loop returns once the running ones have finished."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
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
                    _fail(self.rows + joining, f"{type(e).__name__}: {e}")
                    self.rows, self.decoder = [], None

    def abandon(self, reason: str) -> None:
        """Tell every running and waiting completion that it ends in an error (the loop
        stopped for good: no step will come)."""
        with self.cond:
            choices, self.rows, self.waiting = self.rows + list(self.waiting), [], deque()
        _fail(choices, reason)

    def _step(self) -> None:
        """Sample one token per row, tell each client, drop the finished, feed the rest."""
        tokens = []
        logits = self.decoder.logits[:, :self.enc.n_vocab]  # never an id the tokenizer lacks
        for i, choice in enumerate(self.rows):
            p = choice.params
            token = choice.chosen if choice.chosen is not None else int(next_token(
                logits[i:i + 1], p.temperature, p.top_k, p.top_p, choice.generator)[0])
            choice.chosen = None
            tokens.append(token)
            self._accept(choice, token, logits[i])
        if self._drop_finished(tokens):
            tokens = [tokens[i] for i in self._kept]
            if self.speculator is None or not self._check_guesses(tokens):
                fed = torch.tensor(tokens, device=self.device)
                self.decoder.feed(fed)
                if self.draft is not None:
                    self.draft.feed(fed)

    def _drop_finished(self, tokens: list[int] | None = None) -> bool:
        """Rows that finished or were cancelled leave the batch; whether any row is left."""
        keep = [i for i, c in enumerate(self.rows) if c.finished is None and not c.cancelled]
        self._kept = keep
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.decoder = self.draft = None
            return False
        if len(keep) < self.decoder.rows:
            self.decoder.keep(keep)
            if self.draft is not None:
                self.draft.keep(keep)
        return True

    def _check_guesses(self, tokens: list[int]) -> bool:
        """Each row's guesses after its new token (prompt lookup or the draft), checked in one
        forward for all rows (:mod:`gpt2.speculative`); the kept ones are sent, and the token
        that follows them is the row's next (sent at the next step). False where no row had a
        guess (nothing was fed)."""
        limits = [min(c.params.max_tokens - len(c.ids),
                      self.n_ctx - len(c.prompt) - len(c.ids)) - 1 for c in self.rows]
        dists, drafted = None, 0
        if self.draft is None:
            guesses = [self.speculator.propose(c.prompt + c.ids, limit)
                       for c, limit in zip(self.rows, limits)]
        else:
            guesses, dists, drafted = self._draft_guesses(tokens, limits)
        k = max(len(g) for g in guesses)
        if k == 0:
            return False
        fed = torch.tensor([[t] + g + [t] * (k - len(g)) for t, g in zip(tokens, guesses)],
                           device=self.device)
        logits = self.decoder.extend(fed)
        V = self.enc.n_vocab
        kept, after = [], []
        for j, (choice, g) in enumerate(zip(self.rows, guesses)):
            p = choice.params
            probs = token_probs(logits[j, :len(g) + 1, :V], p.temperature, p.top_k, p.top_p)
            n, choice.chosen = accept(g, probs, None if dists is None else dists[j, :len(g)],
                                      p.temperature == 0 or p.top_k == 1, choice.generator)
            for i, guess in enumerate(g[:n]):
                if choice.finished is None:
                    self._accept(choice, guess, logits[j, i, :V])
            kept.append(1 + n)
            after.append(logits[j, n])
            self.speculator.guessed += len(g)
            self.speculator.kept += n
        self.decoder.retract(k + 1, kept, torch.stack(after))
        if self.draft is not None:  # it fed the new tokens and every guess
            self.draft.retract(drafted + 1, kept, self.draft.logits)
        self._drop_finished()
        return True

    def _draft_guesses(self, tokens: list[int], limits: list[int]):
        """The draft's guesses for every row (each drawn with its row's settings and random
        stream), each cut to its row's limit; the distributions they came from [B, k, V]; how
        many each row was given (0: none, and the draft was not fed)."""
        k = min(self.speculator.tokens, max(limits))
        if k <= 0:
            return [[] for _ in limits], None, 0
        V = self.enc.n_vocab
        token = torch.tensor(tokens, device=self.device)
        drawn, dists = [], []
        for _ in range(k):
            logits = self.draft.feed(token)[:, :V]
            q = torch.stack([token_probs(logits[j], c.params.temperature, c.params.top_k,
                                         c.params.top_p) for j, c in enumerate(self.rows)])
            token = torch.tensor([int(q[j].argmax()) if c.params.temperature == 0
                                  or c.params.top_k == 1 else
                                  int(draw(q[j:j + 1], c.generator)[0])
                                  for j, c in enumerate(self.rows)], device=self.device)
            drawn.append(token)
            dists.append(q)
        self.draft.feed(token)
        rows = torch.stack(drawn, 1).tolist()
        return [g[:max(limit, 0)] for g, limit in zip(rows, limits)], torch.stack(dists, 1), k

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
        if isinstance(self.speculator, DraftModel):
            draft = Decoder(self.speculator.model, x, p.max_tokens + self.speculator.tokens + 1)
            if self.draft is None:
                self.draft = draft
            else:
                self.draft.join(draft)
        self.rows.append(choice)

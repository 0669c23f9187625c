"""Sampling from a GPT: the logit filters and the one decode loop every command uses.

The filters are pure functions over logits, so they can be tested and reused on their own:
temperature first, then top-k, then top-p (OpenAI's ``src/sample.py`` order and semantics).

    context = torch.tensor([enc.encode("Hello, my name is")])          # [B, T]
    out = sample_sequence(model, length=40, context=context, top_k=40, seed=0)
    print(enc.decode(out[0, context.size(1):].tolist()))               # only the new tokens

    new = decode(model, context, 40, top_k=40, finished=lambda row, ids: ids[-1] == eot)

:func:`decode` is the loop (the sample scripts, ``gpt2 generate``, training samples and
``gpt2 evaluate --compare`` all run it): the prompt fills a preallocated KV cache once, then one
token per row per step is fed back; a row that is finished leaves the batch and its cache.
:class:`Decoder` is the cache and the model calls underneath, for loops that schedule rows
themselves (the server, whose requests join and leave between steps).

Differences from the original, on purpose: ``temperature=0`` is greedy (the original divided
by zero); ties at the k-th logit never keep more than k tokens; ``top_p`` 0 means no nucleus
filter, as 1 does (nshepperd's scripts and train.py meant it so; OpenAI's kept only the most
likely token); a context that does not fit in ``n_ctx`` is refused up front instead of
overrunning the position table.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from tqdm import tqdm

from .capture import capture_enabled, shared_step
from .decoder import Decoder
from .kernels import decode_kernels
from .runtime import widest_float


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (exactly k, even with ties); the rest -> -inf.

    ``k = 0`` (or ``k >= vocabulary``) keeps everything.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    # Indices from topk + scatter rather than a `logits < kth_value` threshold: a threshold
    # keeps every token tied with the k-th one, which may be many more than k.
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter, OpenAI's semantics: keep the most likely tokens whose *inclusive*
    cumulative probability is <= p (always at least the most likely one); the rest -> -inf.

    ``p >= 1`` or ``p <= 0`` keeps everything. Tokens already at -inf (e.g. cut by top-k) stay.
    """
    if not 0.0 < p < 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    return torch.empty_like(logits).scatter(-1, order, _top_p_sorted(sorted_logits, p))


def _top_p_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """top_p_logits for logits already sorted in descending order along the last axis."""
    if not 0.0 < p < 1.0:
        return sorted_logits
    cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    keep = cumulative <= p
    keep[..., 0] = True
    return sorted_logits.masked_fill(~keep, float("-inf"))


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` shifted to a maximum of 0 (the same softmax): a temperature so
    small that the quotient would overflow gives the argmax (ties shared), not NaN."""
    return (logits - logits.amax(-1, keepdim=True)) / temperature


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row from probabilities [B, V] (each row summing to ~1) -> [B]: where one
    uniform number per row falls in the row's cumulative distribution (float64 where the
    device has it). The same distribution as ``torch.multinomial(probs, 1)``, which spends a
    random number on every id (1.1 ms a row over GPT-2's 50,257 on this project's CPU, against
    0.05 ms); an id of probability 0 is never drawn."""
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=widest_float(probs.device),
                   device=probs.device)
    return _inverse_cdf(probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The id of each row [B, V] where ``u`` [B, 1] in [0, 1) falls in its cumulative
    distribution; never one of probability 0 (were ``u`` * total to round up to the total, the
    last id of probability > 0). A row that is not a distribution (NaN, inf, all 0: a
    temperature so small that the logits overflow) is a ValueError, as torch.multinomial's."""
    cdf = probs.to(u.dtype).cumsum(-1)
    total = cdf[:, -1:].contiguous()
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("the probabilities to draw from are not a distribution (NaN, inf or "
                         "all 0)")
    ids = torch.searchsorted(cdf, u * total, right=True)
    return torch.minimum(ids, torch.searchsorted(cdf, total)).squeeze(1)


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from last-position logits [B, V] -> [B].

    Greedy for ``temperature=0`` or ``top_k=1``; else a draw from softmax(logits / temperature)
    restricted by top-k (exactly k ids), then top-p (top_k_logits, top_p_logits).
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = tempered(logits, temperature)
    if 0 < top_k < logits.size(-1):
        # The same distribution as masking all but the top k to -inf, drawn among k values.
        values, ids = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        choice = draw(_top_p_sorted(values, top_p).softmax(dim=-1), generator)
        return ids.gather(-1, choice[:, None]).squeeze(1)
    return draw(top_p_logits(logits, top_p).softmax(dim=-1), generator)


def check_length(context_len: int, length: int, n_ctx: int) -> None:
    """Raise ValueError unless a context of ``context_len`` tokens plus ``length`` new ones fit.

    The last sampled token is never fed back, so the model sees ``context_len + length - 1``
    positions: a 1-token context may be followed by exactly ``n_ctx`` new tokens, as in the
    original unconditional sampler.
    """
    if context_len + length - 1 > n_ctx:
        fit = max(n_ctx + 1 - context_len, 0)
        raise ValueError(f"context of {context_len} tokens + length {length} exceeds the model's "
                         f"n_ctx {n_ctx} (at most {fit} new tokens fit)")


def sampling_problem(temperature: float, top_k: int, top_p: float) -> str | None:
    """What is wrong with settings no filter can apply (NaN included), naming the setting
    (``"temperature must be ..."``), or None."""
    if not math.isfinite(temperature) or temperature < 0:
        return f"temperature must be a number >= 0, got {temperature}"
    if top_k < 0:
        return f"top_k must be >= 0 (0 disables it), got {top_k}"
    if not 0.0 <= top_p <= 1.0:
        return f"top_p must be in [0, 1] (0 and 1 disable it), got {top_p}"
    return None


def check_params(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError for settings no filter can apply (:func:`sampling_problem`)."""
    problem = sampling_problem(temperature, top_k, top_p)
    if problem:
        raise ValueError(problem)


def decode(model: torch.nn.Module, context: torch.Tensor | list[list[int]], length: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           finished: Callable[[int, list[int]], bool] | None = None,
           progress: bool | None = False, speculator=None) -> list[list[int]]:
    """Continue each row of ``context`` [B, T] by up to ``length`` tokens: the new ids per row.

    ``context`` may also be a list of id lists of different lengths: each is prefilled on
    its own, then they decode together left-padded (:meth:`Decoder.join`). After each step, a
    row for which ``finished(row, its new ids)`` is true stops and leaves the batch; the loop
    ends when every row has finished or ``length`` tokens were made. The model runs in eval
    mode and inference mode, with the CPU decode kernels, and is put back as it was.
    ``progress`` shows a tqdm bar (None: only when stderr is a terminal). ``speculator`` (a
    :class:`gpt2.speculative.PromptLookup` or ``DraftModel``) guesses tokens that one forward
    checks: greedy output is unchanged, samples keep the model's distribution.
    """
    if isinstance(context, torch.Tensor):
        contexts = [context]
    else:
        device = next(model.parameters()).device
        contexts = [torch.tensor([ids], dtype=torch.long, device=device) for ids in context]
    for c in contexts:
        check_length(c.size(1), length, model.config.n_ctx)
    check_params(temperature, top_k, top_p)
    rows = sum(c.size(0) for c in contexts)
    if length == 0 or not rows:
        return [[] for _ in range(rows)]
    was_training = model.training
    model.eval()
    try:
        step = shared_step() if capture_enabled() else None
        with torch.inference_mode(), decode_kernels(model):
            if speculator is not None:
                with tqdm(total=length * rows, desc="sampling", unit="tok", leave=False,
                          disable=None if progress is None else not progress) as bar, \
                        decode_kernels(speculator.model) if hasattr(speculator, "model") \
                        else contextlib.nullcontext():
                    return speculator.decode(model, contexts, length, temperature, top_k, top_p,
                                             generator, finished, bar, step)
            dec = Decoder(model, contexts[0], length, step=step)
            for c in contexts[1:]:
                dec.join(Decoder(model, c, length))
            return _decode(dec, length, temperature, top_k, top_p, generator, finished,
                           progress)
    finally:
        model.train(was_training)


def _decode(dec: Decoder, length: int, temperature: float, top_k: int, top_p: float,
            generator, finished, progress) -> list[list[int]]:
    tokens: list[list[int]] = [[] for _ in range(dec.rows)]
    steps: list[torch.Tensor] = []  # without `finished`: no per-step conversion to Python
    alive = list(range(dec.rows))   # rows still decoding, in batch order
    bar = tqdm(total=length, desc="sampling", unit="tok", leave=False,
               disable=None if progress is None else not progress)
    for step in range(length):
        new = next_token(dec.logits, temperature, top_k, top_p, generator)
        bar.update()
        if finished is None:
            steps.append(new)
        else:
            keep = []
            for j, (row, token) in enumerate(zip(alive, new.tolist())):
                tokens[row].append(token)
                if not finished(row, tokens[row]):
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                dec.keep(keep)
                new = new[torch.tensor(keep, device=new.device)]
                alive = [alive[j] for j in keep]
        if step < length - 1:
            dec.feed(new)
    bar.close()
    if finished is None:
        return torch.stack(steps, dim=1).tolist()
    return tokens


def sample_sequence(model: torch.nn.Module, length: int, context: torch.Tensor,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int | None = None, stop_at_eot: bool = False, eot_token: int = 50256,
                    generator: torch.Generator | None = None,
                    progress: bool | None = False) -> torch.Tensor:
    """Continue ``context`` [B, T] by ``length`` tokens; returns context + new tokens [B, T+length].

    ``temperature=0`` or ``top_k=1`` is greedy. ``seed`` seeds a fresh generator on the model's
    device (same seed, same samples); pass ``generator`` instead to continue one random stream
    across calls. With ``stop_at_eot`` each row stops once it has produced ``eot_token`` and is
    padded with it. ``progress`` shows a tqdm bar (None: only when stderr is a terminal).
    """
    if context.dim() != 2 or context.size(1) < 1:
        raise ValueError(f"context must be [batch, tokens] with at least one token, "
                         f"got shape {list(context.shape)}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    device = next(model.parameters()).device
    context = context.to(device=device, dtype=torch.long)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    finished = (lambda row, ids: ids[-1] == eot_token) if stop_at_eot else None
    new = decode(model, context, length, temperature, top_k, top_p, generator, finished,
                 progress)
    out = torch.full((context.size(0), context.size(1) + length), eot_token, dtype=torch.long,
                     device=device)
    out[:, :context.size(1)] = context
    for row, ids in enumerate(new):
        out[row, context.size(1):context.size(1) + len(ids)] = torch.tensor(ids, device=device)
    return out


class StopStrings:
    """Stop strings in generated text, the one place they are looked for (``generate``,
    ``generate_batch``, the harness backend, the server): where the first one starts, and, for
    text streamed as it comes, how much can be shown before knowing whether a stop string
    begins there."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def first(self, text: str, sent: int = 0) -> int | None:
        """Where the earliest stop string starts in ``text``, or None; ``sent``: characters
        already searched and shown (a new stop can start at most its length before them)."""
        hits = [i for s in self.stops for i in [text.find(s, max(0, sent - len(s)))] if i >= 0]
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """How much of ``text`` can be sent: not a trailing replacement character (half of a
        character whose other bytes are still to come), nor the start of a stop string."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end


def cut_at_stop(text: str, stop: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    return StopStrings(stop).first(text)


def complete(model: torch.nn.Module, enc, contexts: torch.Tensor | list[list[int]],
             length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop: list[str] | None = None, generator: torch.Generator | None = None,
             speculator=None) -> list[str]:
    """Each context (rows of a tensor, or id lists of any lengths) continued by up to
    ``length`` tokens, decoded, and cut before its first stop string; a row that produced one
    stops generating, and the loop ends when every row has (:func:`decode`)."""
    stops = StopStrings(stop)
    texts: dict[int, str] = {}

    def finished(row: int, ids: list[int]) -> bool:
        text = enc.decode(ids)
        cut = stops.first(text)
        if cut is not None:
            texts[row] = text[:cut]
        return cut is not None

    new = decode(model, contexts, length, temperature, top_k, top_p, generator,
                 finished if stops else None, speculator=speculator)
    return [texts[i] if i in texts else enc.decode(ids) for i, ids in enumerate(new)]


def generate_batch(model: torch.nn.Module, enc, context: list[int], n: int, length: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   stop: list[str] | None = None, generator: torch.Generator | None = None,
                   speculator=None) -> list[str]:
    """``n`` continuations of one ``context`` (token ids), decoded, each cut at its first stop.

    ``enc`` needs only ``decode(ids) -> str``. A row that produced a stop string stops
    generating; the loop ends when every row has stopped or ``length`` tokens were made.
    """
    device = next(model.parameters()).device
    x = torch.tensor([context] * n, dtype=torch.long, device=device)
    return complete(model, enc, x, length, temperature, top_k, top_p, stop, generator,
                    speculator)

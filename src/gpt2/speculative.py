"""Speculative decoding: guess several tokens cheaply, check them with one forward of the model.

    new = decode(model, context, 200, speculator=PromptLookup(10))          # n-grams of the text
    new = decode(model, context, 200, speculator=DraftModel(small, 4))      # a smaller model

A decoding step on a CPU (or a GPU at batch 1) reads every weight once whether it scores one
token or eleven, so scoring a row's next token together with ``k`` guesses costs about one step
and may yield up to ``k + 1`` tokens. The guesses come from a :class:`PromptLookup` (the tokens
that followed the latest earlier occurrence of the text's last n-gram: transformers'
``prompt_lookup_num_tokens``, vLLM's ``ngram``; strong where the output quotes its input) or a
:class:`DraftModel` (any smaller model with the same tokenizer).

Which guesses are kept is the rule of Leviathan et al. (2023) and Chen et al. (2023)
(:func:`accept`): greedy decoding keeps the guesses that equal the model's argmax, so its tokens
are exactly those of plain decoding; sampling keeps guess ``x`` with probability
``min(1, p(x) / q(x))`` (p: the model's distribution after temperature, top-k and top-p; q: the
draft's, a point mass for prompt lookup) and on the first rejection draws from
``max(0, p - q)`` renormalised, so every token has the model's distribution
(tests/test_speculative.py checks both, the second statistically). The random stream differs
from plain sampling's: the same seed gives other (equally distributed) samples.
"""

from __future__ import annotations

import torch

from .decoder import Decoder
from .sampling import draw, tempered, top_k_logits, top_p_logits


def token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                ) -> torch.Tensor:
    """The distribution :func:`gpt2.sampling.next_token` draws from, over the whole vocabulary
    ([..., V] -> [..., V]); for ``temperature`` 0 (greedy) a point mass at the argmax."""
    if temperature == 0 or top_k == 1:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return top_p_logits(top_k_logits(tempered(logits, temperature), top_k), top_p).softmax(
        dim=-1)


def accept(guesses: list[int], target: torch.Tensor, draft: torch.Tensor | None,
           greedy: bool, generator: torch.Generator | None) -> tuple[int, int]:
    """(how many of ``guesses`` are kept, the token that follows them).

    ``target`` [len(guesses) + 1, V]: the model's distributions (:func:`token_probs`) after the
    last token and after each guess; ``draft`` [len(guesses), V]: the drafter's, from which each
    guess was drawn (None: each guess was certain, a point mass). Greedy: the guesses equal to
    the argmax are kept, and the argmax after them follows.
    """
    for i, guess in enumerate(guesses):
        p = target[i]
        if greedy:
            best = int(p.argmax())
            if guess != best:
                return i, best
            continue
        q = float(draft[i, guess]) if draft is not None else 1.0
        if float(torch.rand((), generator=generator, device=p.device)) * q < float(p[guess]):
            continue  # kept with probability min(1, p / q)
        residual = p.clone()
        if draft is None:
            residual[guess] = 0.0
        else:
            residual = (residual - draft[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q: rejection had probability 0
            residual = p
        return i, int(draw((residual / residual.sum())[None], generator)[0])
    last = target[len(guesses)]
    if greedy:
        return len(guesses), int(last.argmax())
    return len(guesses), int(draw(last[None], generator)[0])


class Speculator:
    """What :func:`gpt2.sampling.decode` calls with ``speculator=``: :func:`run`. ``guessed``
    and ``kept`` count the guesses checked and kept (the acceptance rate is their ratio)."""

    tokens: int
    guessed = kept = 0

    def decode(self, *args, **kwargs) -> list[list[int]]:
        return run(self, *args, **kwargs)


class PromptLookup(Speculator):
    """Guesses from the text itself: find the latest earlier occurrence of the last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose up to ``tokens`` that followed it.
    """

    def __init__(self, tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1):
        if tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs tokens >= 1 and 1 <= min_ngram <= max_ngram, "
                             f"got {tokens}, {min_ngram}, {max_ngram}")
        self.tokens, self.max_ngram, self.min_ngram = tokens, max_ngram, min_ngram

    def propose(self, ids: list[int], limit: int) -> list[int]:
        """Up to ``min(tokens, limit)`` guesses to follow ``ids``; [] where nothing matches.
        The latest match with that many tokens after it wins; else the one with the most
        (a match near the end has few: in a repeating run the latest one has a single)."""
        limit = min(self.tokens, limit)
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail, best = ids[-n:], []
            for start in range(len(ids) - n - 1, -1, -1):  # latest match first
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + limit]
                    if len(follow) == limit:
                        return follow
                    best = max(best, follow, key=len)
            if best:
                return best
        return []


class DraftModel(Speculator):
    """Guesses from a smaller model with the same tokenizer, ``tokens`` at a time, drawn from
    its distribution with the same temperature, top-k and top-p (greedy: its argmax)."""

    def __init__(self, model: torch.nn.Module, tokens: int = 4):
        if tokens < 1:
            raise ValueError(f"a draft proposes at least 1 token, got {tokens}")
        self.model, self.tokens = model, tokens

    def start(self, contexts: list[torch.Tensor], room: int) -> Decoder:
        """The draft's cache over the same rows (contexts as :func:`gpt2.sampling.decode`
        gives them), with room for ``room`` more positions."""
        dec = Decoder(self.model, contexts[0], room)
        for c in contexts[1:]:
            dec.join(Decoder(self.model, c, room))
        return dec


def _guess(speculator, draft: Decoder | None, ids: list[list[int]], pending: list[int],
           limits: list[int], temperature: float, top_k: int, top_p: float,
           generator) -> tuple[list[list[int]], torch.Tensor | None]:
    """Each row's guesses (at most its limit) and, from a draft, the distributions they were
    drawn from [B, k, V] (None for prompt lookup)."""
    if draft is None:
        return [speculator.propose(row, limit) for row, limit in zip(ids, limits)], None
    k = max(0, min(speculator.tokens, max(limits)))
    if k == 0:
        return [[] for _ in limits], None
    greedy = temperature == 0 or top_k == 1
    token = torch.tensor(pending, device=draft.device)
    guesses, dists = [], []
    for _ in range(k):
        q = token_probs(draft.feed(token), temperature, top_k, top_p)
        token = q.argmax(-1) if greedy else draw(q, generator)
        guesses.append(token)
        dists.append(q)
    draft.feed(token)  # the last guess too: the cache then holds every guess (cut back later)
    rows = torch.stack(guesses, 1).tolist()
    return [g[:limit] for g, limit in zip(rows, limits)], torch.stack(dists, 1)


def run(speculator, model: torch.nn.Module, contexts: list[torch.Tensor], length: int,
        temperature: float, top_k: int, top_p: float, generator, finished, bar,
        step=None) -> list[list[int]]:
    """:func:`gpt2.sampling.decode` with guesses (called by it when given a speculator):
    each row's new ids."""
    from .sampling import next_token

    room = length + speculator.tokens + 1
    dec = Decoder(model, contexts[0], room, step=step)
    for c in contexts[1:]:
        dec.join(Decoder(model, c, room))
    draft = speculator.start(contexts, room) if isinstance(speculator, DraftModel) else None
    ids = [row for c in contexts for row in c.tolist()]
    new: list[list[int]] = [[] for _ in ids]
    alive = list(range(len(ids)))
    greedy = temperature == 0 or top_k == 1
    pending = next_token(dec.logits, temperature, top_k, top_p, generator).tolist()
    chosen: list[list[int]] = [[t] for t in pending]  # tokens of this round, in order

    while True:
        keep = []
        for j, row in enumerate(alive):
            for token in chosen[j]:
                new[row].append(token)
                ids[row].append(token)
                bar.update()
                stop = finished is not None and finished(row, new[row])  # (the last too)
                if stop or len(new[row]) >= length:
                    break
            else:
                keep.append(j)
        if not keep:
            return new
        if len(keep) < len(alive):
            dec.keep(keep)
            if draft is not None:
                draft.keep(keep)
            alive = [alive[j] for j in keep]
            pending = [pending[j] for j in keep]
        limits = [length - len(new[row]) - 1 for row in alive]
        guesses, dists = _guess(speculator, draft, [ids[row] for row in alive], pending, limits,
                                temperature, top_k, top_p, generator)
        k = max(len(g) for g in guesses)
        if k == 0:  # nothing to check: a plain step (the captured one where there is one)
            if draft is not None:
                draft.feed(torch.tensor(pending, device=draft.device))
            dec.feed(torch.tensor(pending, device=dec.device))
            pending = next_token(dec.logits, temperature, top_k, top_p, generator).tolist()
            chosen = [[t] for t in pending]
            continue
        fed = torch.tensor([[t] + g + [t] * (k - len(g)) for t, g in zip(pending, guesses)],
                           device=dec.device)
        logits = dec.extend(fed)
        probs = token_probs(logits, temperature, top_k, top_p)
        kept, after, chosen, pending = [], [], [], []
        for j, g in enumerate(guesses):
            n, token = accept(g, probs[j, :len(g) + 1],
                              None if dists is None else dists[j, :len(g)], greedy, generator)
            kept.append(1 + n)
            speculator.guessed += len(g)
            speculator.kept += n
            after.append(logits[j, n])
            chosen.append(g[:n] + [token])
            pending.append(token)
        dec.retract(k + 1, kept, torch.stack(after))
        if draft is not None:  # it fed the pending token and all k guesses
            draft.retract(k + 1, kept, draft.logits)

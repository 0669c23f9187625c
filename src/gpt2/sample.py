"""Autoregressive sampling from a GPT: temperature, top-k, top-p, using the model's KV cache.

The filters are pure functions over logits, so they can be tested and reused on their own:
temperature first, then top-k, then top-p (OpenAI's ``src/sample.py`` order and semantics).

    context = torch.tensor([enc.encode("Hello, my name is")])          # [B, T]
    out = sample_sequence(model, length=40, context=context, top_k=40, seed=0)
    print(enc.decode(out[0, context.size(1):].tolist()))               # only the new tokens

Differences from the original, on purpose: ``temperature=0`` is greedy (the original divided
by zero); ties at the k-th logit never keep more than k tokens; a context that does not fit in
``n_ctx`` is refused up front instead of overrunning the position table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import empty_kv_cache


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

    ``p >= 1`` keeps everything. Tokens already at -inf (e.g. cut by top-k) stay there.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    return torch.empty_like(logits).scatter(-1, order, _top_p_sorted(sorted_logits, p))


def _top_p_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """top_p_logits for logits already sorted in descending order along the last axis."""
    if p >= 1.0:
        return sorted_logits
    cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    keep = cumulative <= p
    keep[..., 0] = True
    return sorted_logits.masked_fill(~keep, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from last-position logits [B, V] -> [B].

    Greedy for ``temperature=0`` or ``top_k=1``; else a draw from softmax(logits / temperature)
    restricted by top-k (exactly k ids), then top-p (top_k_logits, top_p_logits).
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        # The same distribution as masking all but the top k to -inf, but the draw is among k
        # values: torch.multinomial spends a random number on every id, 50,257 per row.
        values, ids = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        choice = torch.multinomial(_top_p_sorted(values, top_p).softmax(dim=-1), 1,
                                   generator=generator)
        return ids.gather(-1, choice).squeeze(1)
    logits = top_p_logits(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def check_fits(context_len: int, length: int, n_ctx: int) -> None:
    """Raise ValueError unless a context of ``context_len`` tokens plus ``length`` new ones fit.

    The last sampled token is never fed back, so the model sees ``context_len + length - 1``
    positions: a 1-token context may be followed by exactly ``n_ctx`` new tokens, as in the
    original unconditional sampler.
    """
    if context_len + length - 1 > n_ctx:
        fit = max(n_ctx + 1 - context_len, 0)
        raise ValueError(f"context of {context_len} tokens + length {length} exceeds the model's "
                         f"n_ctx {n_ctx} (at most {fit} new tokens fit)")


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the attention keys and values will have: autocast's, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def sample_sequence(model: torch.nn.Module, length: int, context: torch.Tensor,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int | None = None, stop_at_eot: bool = False, eot_token: int = 50256,
                    generator: torch.Generator | None = None,
                    progress: bool | None = False) -> torch.Tensor:
    """Continue ``context`` [B, T] by ``length`` tokens; returns context + new tokens [B, T+length].

    The context is run once to fill the KV cache, then one token at a time is fed back.
    ``temperature=0`` or ``top_k=1`` is greedy. ``seed`` seeds a fresh generator on the model's
    device (same seed, same samples); pass ``generator`` instead to continue one random stream
    across calls. With ``stop_at_eot`` each row stops once it has produced ``eot_token`` and is
    padded with it; sampling ends early when every row has stopped. ``progress`` shows a tqdm
    bar (None: only when stderr is a terminal).

    The model is put in eval mode for the call (dropout off) and restored afterwards.
    """
    if context.dim() != 2 or context.size(1) < 1:
        raise ValueError(f"context must be [batch, tokens] with at least one token, "
                         f"got shape {list(context.shape)}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    check_fits(context.size(1), length, model.config.n_ctx)

    device = next(model.parameters()).device
    context = context.to(device=device, dtype=torch.long)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if length == 0:
        return context.clone()

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # The cache is written in place into buffers for the whole sequence (no torch.cat
            # of every layer's keys and values per token), and the prompt's logits are needed
            # for its last position only. Neither changes a single number.
            past = empty_kv_cache(model.config, context.size(0), context.size(1) + length,
                                  device=device, dtype=_cache_dtype(model, device))
            logits, past = model(context, past=past, use_cache=True, last_only=True)
            done = torch.zeros(context.size(0), dtype=torch.bool, device=device)
            tokens = [context]
            bar = tqdm(total=length, desc="sampling", unit="tok", leave=False,
                       disable=None if progress is None else not progress)
            for step in range(length):
                token = next_token(logits[:, -1, :].float(), temperature, top_k, top_p,
                                    generator)
                if stop_at_eot:
                    token = token.masked_fill(done, eot_token)
                    done |= token == eot_token
                tokens.append(token[:, None])
                bar.update()
                if step == length - 1 or (stop_at_eot and bool(done.all())):
                    break
                logits, past = model(token[:, None], past=past, use_cache=True)
            bar.close()
            out = torch.cat(tokens, dim=1)
            missing = context.size(1) + length - out.size(1)
            if missing:  # every row stopped early: pad so the shape is always [B, T+length]
                out = F.pad(out, (0, missing), value=eot_token)
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor: inference tensors refuse later in-place edits

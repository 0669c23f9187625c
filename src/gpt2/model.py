"""GPT-2 as a plain ``torch.nn.Module``, and the config that is a model directory's hparams.json.

The module computes and nothing else: no file or network I/O, no prints, no device, precision,
kernel, compile or distribution code (those are applied from outside: :mod:`gpt2.runtime`,
:mod:`gpt2.kernels`, :mod:`gpt2.training.parallelize`). Parameter names follow OpenAI's release
(``wte wpe h.{i}.ln_1 attn.c_attn attn.c_proj ln_2 mlp.c_fc mlp.c_proj ln_f``) so that weight
conversion is a table, not a puzzle.

    config = GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
    model = GPT(config)
    logits = model(tokens)                                  # [B, T] -> [B, T, n_vocab]
    logits, present = model(tokens, use_cache=True)         # present: one (k, v) per layer
    logits, present = model(next_token, past=present, use_cache=True)

    past = empty_kv_cache(config, batch=1, max_len=1024)    # optional: preallocated cache that
    logits, present = model(tokens, past=past, use_cache=True)  # grows in place, no torch.cat

    loss = model(tokens, targets=tokens)                    # next-token cross-entropy (token_loss)
    loss = model(tokens, targets=tokens, loss_chunk=256)    # the same, no [B, T, V] logits

The three calls are separate contracts: ``model(tokens)`` gives logits, ``use_cache=True``
(with ``past``, ``last_only``, ``key_mask``) logits and the new cache, ``targets=`` the training
loss over whole sequences; a keyword that does not apply to the call is an error, not ignored.
The loss has one definition, :func:`token_loss`, computed in one [rows, V] buffer or, with
``chunk``, a chunk of rows at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# One layer's cache: keys and values, each [batch, heads, sequence, head_dim].
LayerPast = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GPTConfig:
    """hparams.json: the five keys of OpenAI's release, plus dropout for training from scratch."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from hparams.json's contents; unknown keys are ignored, as the original did."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["dropout"]:
            del d["dropout"]  # keep hparams.json identical to the release's five keys
        return d

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, as GPT(config).named_parameters() (tied head once)."""
    E, V, C = config.n_embd, config.n_vocab, config.n_ctx
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, E), "wpe.weight": (C, E)}
    for i in range(config.n_layer):
        for name, shape in (("ln_1.weight", (E,)), ("ln_1.bias", (E,)),
                            ("attn.c_attn.weight", (3 * E, E)), ("attn.c_attn.bias", (3 * E,)),
                            ("attn.c_proj.weight", (E, E)), ("attn.c_proj.bias", (E,)),
                            ("ln_2.weight", (E,)), ("ln_2.bias", (E,)),
                            ("mlp.c_fc.weight", (4 * E, E)), ("mlp.c_fc.bias", (4 * E,)),
                            ("mlp.c_proj.weight", (E, 4 * E)), ("mlp.c_proj.bias", (E,))):
            shapes[f"h.{i}.{name}"] = shape
    shapes["ln_f.weight"] = (E,)
    shapes["ln_f.bias"] = (E,)
    return shapes


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[batch, sequence, features] -> queries, keys, values [batch, heads, sequence,
        head_dim] (views of one projection)."""
        B, T, E = x.shape
        return self.c_attn(x).view(B, T, 3, self.n_head, E // self.n_head).permute(
            2, 0, 3, 1, 4).unbind(0)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """Attention output [batch, heads, sequence, head_dim] -> projected [batch, sequence,
        features] (before dropout)."""
        B, _, T, _ = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, past: LayerPast | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerPast]:
        T = x.size(1)
        q, k, v = self.heads(x)
        if past is not None:
            k, v = _extend(past[0], k), _extend(past[1], v)
        present = (k, v)
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):
            # packed rows through an attention of its own (gpt2.attention's document mask)
            y = mask.attend(q, k, v)
        elif mask is not None:  # rows of different lengths, left-padded: [B, 1, T, S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # SDPA's is_causal aligns the mask to the top-left corner; with a cache the new
            # queries sit at the bottom-right: query i may see key j iff j <= i + (S - T).
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = self.merge(y)
        return (self.resid_drop(y) if self.training else y), present


def _segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions of packed sequences, counted from each segment's start."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def _segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """The [B, 1, T, T] attention mask of packed sequences: causal, and within a segment only."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, None, :, None] == segments[:, None, None, :]) & causal


def _padded_causal(key_mask: torch.Tensor, T: int, past_len: int) -> torch.Tensor:
    """The [B, 1, T, past + T] mask of left-padded rows: causal, padding left out; padding
    sees itself only, so that no row of the mask is empty (NaN)."""
    causal = torch.ones(T, past_len + T, dtype=torch.bool, device=key_mask.device).tril(
        diagonal=past_len)
    return (key_mask[:, None, None, :] & causal) | causal.triu(diagonal=past_len)


def _extend(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """cached [B, H, S, D] followed by new [B, H, T, D] along the sequence.

    A cache from :func:`empty_kv_cache` is a view into a buffer with room after it: the new keys
    are written into that room and a longer view returned, so decoding copies T positions per
    step instead of all S + T (torch.cat). Never while recording gradients: writing into a
    buffer that earlier steps saved for backward would invalidate them.
    """
    if torch.is_grad_enabled():  # checked first: a traced graph (ONNX) has no storage to ask
        return torch.cat((cached, new), dim=2)
    S = cached.size(2)
    grown = cache_view(cached, S + new.size(2))
    if grown is None or new.dtype != cached.dtype or new.device != cached.device:
        return torch.cat((cached, new), dim=2)
    grown[:, :, S:].copy_(new)
    return grown


def cache_view(cached: torch.Tensor, length: int) -> torch.Tensor | None:
    """``cached`` [B, H, S, D] as ``length`` positions of its [B, H, capacity, D] buffer (a
    view), or None where there is no such buffer with that many."""
    B, H, _, D = cached.shape
    room = cached.untyped_storage().nbytes() // cached.element_size() - cached.storage_offset()
    if (cached.stride(3) != 1 or cached.stride(2) != D or cached.stride(1) < length * D
            or cached.stride(0) != H * cached.stride(1)
            or room < (B - 1) * cached.stride(0) + (H - 1) * cached.stride(1) + length * D):
        return None
    return cached.as_strided((B, H, length, D), cached.stride())


def empty_kv_cache(config: GPTConfig, batch: int, max_len: int | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None
                   ) -> list[LayerPast]:
    """A zero-length ``past`` backed by buffers for ``max_len`` positions (default n_ctx).

    Pass it as ``past`` with ``use_cache=True`` (under ``torch.no_grad`` or inference mode) and
    feed each returned ``present`` back: every step writes into the same buffers. The returned
    caches share those buffers, so do not branch two continuations from one ``present``; a
    cache that is full, or any use with gradients on, falls back to copying (torch.cat).
    """
    max_len = config.n_ctx if max_len is None else max_len
    shape = (batch, config.n_head, max_len, config.head_dim)
    # Zeros, not garbage, after the positions in use: a step that attends over the whole
    # buffer with a mask (gpt2.capture) must not meet a NaN there (0 x NaN is NaN).
    return [tuple(torch.zeros(shape, device=device, dtype=dtype)[:, :, :0] for _ in range(2))
            for _ in range(config.n_layer)]


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU; the exact erf form differs by ~1e-3.
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.drop(y) if self.training else y  # (a module call less per layer decoding)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: LayerPast | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerPast]:
        a, present = self.attn(self.ln_1(x), past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(config.n_embd, config.n_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2: logits = h @ wte^T
        # How packed rows (segments=) attend: None, a dense mask; else a callable set from
        # outside (gpt2.attention.use_document_masking) giving an object with .attend(q, k, v).
        self.segment_mask = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name == "wpe.weight":
                nn.init.normal_(p, std=0.01)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self) -> int:
        """Parameter count (the tied head counted once): 124,439,808 for 124M."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens: torch.Tensor, past: list[LayerPast] | None = None,
                      use_cache: bool = True, key_mask: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None, positions: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[LayerPast]]:
        """Final layer-normed states [B, T, n_embd] and the new cache (one (k, v) per layer).

        ``use_cache=False`` returns an empty cache: training then does not hold every layer's
        keys and values until the forward ends (with activation checkpointing they would be
        the largest thing alive).

        ``key_mask`` [B, past + T] (bool, True for a real token) lets rows of different lengths
        share one cache: each row's padding is left out of attention, and its positions count
        its own tokens only.

        ``segments`` [B, T] (ints, each segment a contiguous run) packs several sequences in a
        row: a token attends only to earlier tokens of its own segment, and positions restart
        at 0 at each segment's start, so every sequence is computed as if it were alone.

        ``positions`` [B, T] gives the position ids instead of counting them (a runtime that
        keeps its own, as ONNX's decoder signature does); they are not checked here.
        """
        B, T = tokens.shape
        past_len = 0 if past is None else past[0][0].size(2)
        if segments is not None:
            if past is not None or key_mask is not None or positions is not None:
                raise ValueError("segments= packs whole sequences: past, key_mask and "
                                 "positions do not apply to it")
            positions = _segment_positions(segments)
            # the dense mask, or an attention object set from outside (gpt2.attention)
            mask = (_segment_mask(segments) if self.segment_mask is None
                    else self.segment_mask(segments))
        elif key_mask is None and positions is None:
            if past_len + T > self.config.n_ctx:
                raise ValueError(f"sequence of {past_len + T} tokens is longer than n_ctx "
                                 f"({self.config.n_ctx})")
            positions = torch.arange(past_len, past_len + T, device=tokens.device)
            mask = None
        else:
            if positions is None:  # a token's position counts the real tokens before it
                positions = (key_mask.cumsum(1) - 1)[:, past_len:].clamp(min=0)
                if int(positions.max()) >= self.config.n_ctx:
                    raise ValueError(f"a row of {int(positions.max()) + 1} tokens is longer "
                                     f"than n_ctx ({self.config.n_ctx})")
            mask = None if key_mask is None else _padded_causal(key_mask, T, past_len)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        present = []
        for i, block in enumerate(self.h):
            x, layer_present = block(x, None if past is None else past[i], mask)
            if use_cache:
                present.append(layer_present)
        return self.ln_f(x), present

    def forward(self, tokens: torch.Tensor, past: list[LayerPast] | None = None,
                use_cache: bool = False, last_only: bool = False,
                targets: torch.Tensor | None = None, loss_chunk: int = 0,
                key_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, reduction: str = "mean"):
        """tokens [B, T] -> logits [B, T, n_vocab]; with use_cache, also the new cache.

        ``last_only`` computes the logits of the last position only ([B, 1, n_vocab]): all a
        sampler needs after feeding a prompt, without T - 1 rows of the largest matmul.

        ``targets`` [B, T] returns the training loss instead: position t predicts
        ``targets[:, t + 1]`` (pass the tokens themselves; -100 marks a token not to predict),
        :func:`token_loss` of the final states, inside the forward that DDP, FSDP and
        torch.compile wrap. ``loss_chunk`` > 0 computes it ``loss_chunk`` rows at a time, never
        holding [B, T, n_vocab] logits. ``reduction="none"`` returns each position's loss
        instead ([B, T], 0 where the target is -100): what objectives that score whole
        sequences (preference tuning) sum themselves. With ``targets``, ``past``, ``use_cache``,
        ``last_only`` and ``key_mask`` do not apply and are refused. ``key_mask`` and
        ``segments`` (sequences packed in a row, for a loss or logits): see
        :meth:`hidden_states`.
        """
        if targets is not None:
            if past is not None or use_cache or last_only or key_mask is not None:
                raise ValueError("targets= computes the training loss over whole sequences: "
                                 "past, use_cache, last_only and key_mask do not apply to it")
            h, _ = self.hidden_states(tokens, use_cache=False, segments=segments)
            targets = next_token_targets(targets)
            loss = token_loss(h, self.lm_head.weight, targets, chunk=loss_chunk,
                              reduction=reduction)
            return loss.view(targets.shape) if reduction == "none" else loss
        if loss_chunk:
            raise ValueError("loss_chunk applies to the loss only (pass targets=)")
        h, present = self.hidden_states(tokens, past, use_cache, key_mask, segments, positions)
        logits = self.lm_head(h[:, -1:] if last_only else h)
        return (logits, present) if use_cache else logits


def set_dropout(model: GPT, p: float) -> None:
    """Change a built model's dropout (released models are built with none)."""
    model.config = dataclasses.replace(model.config, dropout=p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, Attention):
            m.dropout = p


IGNORE = -100  # a target that is not scored (the convention of torch and transformers)


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] -> what each position predicts: the next token; the last position nothing.

    Shifting the targets, not the logits: logits[:, :-1] is not a view, and flattening it
    would copy the whole [B, T, V] tensor (and its gradient).
    """
    return F.pad(tokens[:, 1:], (0, 1), value=IGNORE)


def token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               chunk: int = 0, reduction: str = "mean") -> torch.Tensor:
    """The language-model loss, its one definition: the cross-entropy of the logits
    ``F.linear(hidden, weight)`` against ``targets``, over the rows whose target is not -100.

    hidden [..., E] (final states), weight [V, E] (the head), targets [...] (ids or -100);
    ``reduction`` ``mean`` (per scored row), ``sum``, or ``none`` (each row's loss, 0 where not
    scored; the plain head's memory: ``chunk`` does not apply). ``chunk`` 0 holds the logits of all rows
    in one buffer, turned in place into probabilities and then into the loss's gradient: one
    [rows, V] tensor where the plain head allocates four (logits, log-softmax, and the two
    gradients), and a fresh weight gradient the tied embedding's is added into. ``chunk`` > 0
    computes ``chunk`` rows at a time, straight into the gradients of hidden and weight, so
    the head needs about ``chunk x V x 4`` bytes instead. Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32, as the plain head would. Equal to
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)`` up to
    rounding, in value and gradients (tests/test_perf_ops.py).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if reduction == "none":
        return F.cross_entropy(F.linear(h, weight).float(), t, ignore_index=IGNORE,
                               reduction="none")
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if chunk > 0:
        return _ChunkedLoss.apply(h, weight, t, chunk, reduction == "mean", wants_grad)
    return _OneBufferLoss.apply(h, weight, t, reduction == "mean", wants_grad)


def _scored(targets: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(which rows are scored, their targets with 0 elsewhere, what the sum is divided by)."""
    valid = targets != IGNORE
    divisor = valid.sum() if mean else torch.ones((), dtype=torch.long, device=targets.device)
    return valid, targets.masked_fill(~valid, 0), divisor


class _OneBufferLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, mean: bool, wants_grad: bool):
        logits = F.linear(h, weight)
        x = logits.float()  # the same tensor in fp32; under autocast the one fp32 copy
        valid, safe, n = _scored(targets, mean)
        picked = x.gather(1, safe[:, None])
        m = x.amax(dim=-1, keepdim=True)
        p = x.sub_(m).exp_()  # unnormalised probabilities, in place over the logits
        s = p.sum(dim=-1, keepdim=True)
        loss = ((m + s.log() - picked).squeeze(1) * valid).sum() / n
        if wants_grad:
            # d(loss)/d(logits) = (softmax - one_hot) / n on scored rows, 0 on the others.
            g = p.mul_(valid[:, None] / (n * s))
            g[torch.arange(g.size(0), device=g.device), safe] -= valid / n
            ctx.compute_dtype = logits.dtype
            ctx.save_for_backward(h, weight, g)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, g = ctx.saved_tensors
        g = g.to(ctx.compute_dtype)  # fp32: no copy; autocast: the matmuls' dtype, as plain
        grad_h = grad_w = None
        # grad_out scales the small operand, never the [N, V] gradient (kept for retain_graph).
        if ctx.needs_input_grad[0]:
            grad_h = (g @ weight.to(ctx.compute_dtype)).mul_(grad_out).to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().mm((h * grad_out).to(ctx.compute_dtype)).to(weight.dtype)
        return grad_h, grad_w, None, None, None


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, mean: bool, wants_grad: bool):
        valid, safe, n = _scored(targets, mean)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if wants_grad and ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if wants_grad and ctx.needs_input_grad[1] else None)
        for start in range(0, h.size(0), chunk):
            h_c, t_c, v_c = h[start:start + chunk], safe[start:start + chunk], \
                valid[start:start + chunk]
            logits = (h_c @ weight.t()).float()
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, t_c[:, None]).squeeze(1)) * v_c).sum()
            if not wants_grad:
                continue
            # d(loss)/d(logits) = (softmax - one_hot) / n, built in place over the logits.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(t_c.numel(), device=g.device), t_c] -= 1.0
            g.mul_(v_c[:, None] / n)
            # Written into place (out=, addmm_): no [V, E] temporary per chunk.
            if grad_h is not None:
                torch.mm(g.to(weight.dtype), weight, out=grad_h[start:start + chunk])
            if grad_w is not None and h_c.dtype == torch.float32:
                grad_w.addmm_(g.t(), h_c)
            elif grad_w is not None:
                grad_w += (g.t().to(h_c.dtype) @ h_c).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None)

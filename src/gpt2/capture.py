"""The one-token decode step as one compiled graph, applied from outside the model.

    step = CapturedStep()                         # one per process is enough (see below)
    logits = step(model, tokens, positions, index, cache, mask)

A decoding step feeds one token per row: ``tokens`` and ``positions`` [B] (ids, and each row's
position), ``index`` [1] (where the new keys go in the cache), ``cache`` one (keys, values) per
layer, each a whole preallocated buffer [B, heads, C, head_dim] that the step writes into at
``index``, and ``mask`` [B, C] (bool, True where a row has a real token, the new one included).
Attending over the whole buffer with a mask, instead of over a view that grows by a position a
step, keeps every shape fixed while a sequence grows: :func:`torch.compile` traces the step once
(shapes symbolic: one graph for every batch size above 1 and every cache length, one more for a
single row) and Inductor fuses what lies between the matmuls (layer norms, GELU, residual adds,
the cache writes, attention itself) into C++ loops. The matmuls stay PyTorch's CPU kernels
(``torch.ops.gpt2``, :mod:`gpt2.kernels`): oneDNN's fp32 matmul and FBGEMM's int8.

The compiled code is kept on disk by Inductor (its FX graph cache, in
``~/.cache/gpt2/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise): the first run
pays for compiling, a later run for tracing and loading (``bench/capture.py``). Where compiling
fails (no C++ compiler, a device Inductor does not support), :meth:`CapturedStep.__call__`
returns None once and says so in one warning line; callers decode eagerly from then on.
``GPT2_CAPTURE=1`` turns the captured step on (:func:`capture_enabled`: off by default).

The numbers are those of eager decoding up to the order of a few sums (logits within 1e-5 in
fp32; greedy tokens identical: tests/test_capture.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def capture_enabled() -> bool:
    """Whether decoding uses the captured step: ``GPT2_CAPTURE=1``. Off by default: on this
    project's CPU it is 10-14% faster at batch 1 in int8, 5-23% in fp32 and 2-5% a client in
    the server, for ~9.5 s of tracing per process (31-35 s the first time a shape is compiled;
    bench/RESULTS.md), so it pays only for long sessions; on GPUs, where launches dominate small
    steps, it is unmeasured here."""
    return os.environ.get("GPT2_CAPTURE", "0").strip().lower() in ("1", "on", "yes", "true")


def step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
         index: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]],
         mask: torch.Tensor) -> torch.Tensor:
    """One token per row through ``model`` (a :class:`gpt2.model.GPT`): last-position logits
    [B, n_vocab] in fp32. Block.forward's wiring, with the cache written in place at ``index``
    and attention over the whole buffer, ``mask`` leaving out what is not a row's token."""
    x = model.wte(tokens[:, None]) + model.wpe(positions[:, None])
    hidden = torch.where(mask, 0.0, float("-inf"))[:, None, :]  # [B, 1, C]
    for block, (keys, values) in zip(model.h, cache):
        q, k, v = block.attn.heads(block.ln_1(x))
        keys.index_copy_(2, index, k)
        values.index_copy_(2, index, v)
        x = x + block.attn.merge(_attend(q, keys, values, hidden))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))[:, -1].float()


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor
            ) -> torch.Tensor:
    """Attention of one query per row [B, H, 1, D] over the whole buffers [B, H, C, D], what is
    not a row's token (``hidden``: -inf there) left out: written as products and sums, in fp32,
    which Inductor fuses into two loops over the cache (SDPA's kernel would be an external call
    costing more than this work, 12 times a token)."""
    scores = (q.float() * keys.float()).sum(-1) * q.size(-1) ** -0.5 + hidden  # [B, H, C]
    weights = scores.softmax(-1)[..., None]
    return (weights * values.float()).sum(-2, keepdim=True).to(q.dtype)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises (not what a model's own error raises)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    errors: list[type[BaseException]] = [BackendCompilerFailed, InductorError]
    try:
        from torch._inductor.exc import CppCompileError
        errors.append(CppCompileError)
    except ImportError:  # older builds
        pass
    return tuple(errors)


class CapturedStep:
    """:func:`step` compiled (shapes symbolic), or eager after one failure to compile."""

    failed: str | None = None  # why compiling failed in this process (then: eager)

    def __init__(self) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2" / "inductor"))
        # (no size asserts: ~190 checks a step of the shapes the trace itself guarantees)
        self._compiled = torch.compile(step, dynamic=True, options={"size_asserts": False})

    def __call__(self, model, tokens, positions, index, cache, mask) -> torch.Tensor | None:
        """The step's logits, or None where compiling failed (then and ever after)."""
        if CapturedStep.failed is not None:
            return None
        try:
            return self._compiled(model, tokens, positions, index, cache, mask)
        except _compile_errors() as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            CapturedStep.failed = reason[:200]
            print(f"warning: decoding without a compiled step (torch.compile failed: "
                  f"{CapturedStep.failed})", file=sys.stderr)
            return None


_shared: CapturedStep | None = None


def shared_step() -> CapturedStep:
    """The process's one :class:`CapturedStep` (its traces serve every model and batch)."""
    global _shared
    if _shared is None:
        _shared = CapturedStep()
    return _shared

"""Attention over packed rows without a dense mask: FlexAttention's document mask, applied to
a model from outside (the model module has no kernel branches).

    use_document_masking(model)          # packed rows (segments=) attend through FlexAttention
    loss = model(tokens, targets=tokens, segments=segments)

Packed rows (several sequences in a row, ``GPT.forward(segments=...)``) otherwise attend with a
dense [B, 1, T, T] boolean mask, which keeps SDPA off its flash and memory-efficient kernels
and costs T x T bytes a row. FlexAttention (:mod:`torch.nn.attention.flex_attention`) takes the
same rule as a function (causal, and within a segment only), builds a block-sparse mask from it
and skips the blocks no query may see. It is compiled to be fast (once per shape), and has no
backward pass on the CPU in torch 2.13: training uses it on GPUs (``gpt2 train
--packed_attention``, default ``auto``: FlexAttention on CUDA, the dense mask elsewhere). On the
CPU its forward equals the dense path to 1e-5 (tests/test_attention.py).
"""

from __future__ import annotations

import torch

from .runtime import backend_of

FLEX = "flex"
DENSE = "dense"


def flex_problem(device: torch.device | str) -> str | None:
    """Why FlexAttention cannot train on ``device`` (a reason to show), or None where it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.flex_attention"
    backend = backend_of(torch.device(device))
    if not backend.flex_training:
        return f"FlexAttention has no backward pass on {backend.what} (torch 2.13)"
    return None


def resolve(choice: str, device: torch.device | str) -> str:
    """``auto`` -> FlexAttention where it trains (CUDA), else the dense mask; other choices as
    given (``flex`` where it cannot train: ValueError with the reason)."""
    if choice == "auto":
        return FLEX if flex_problem(device) is None else DENSE
    if choice == FLEX:
        problem = flex_problem(device)
        if problem:
            raise ValueError(problem)
    return choice


class DocumentMask:
    """What ``GPT.hidden_states`` hands each attention layer for packed rows instead of the
    dense mask: the block mask of ``segments`` [B, T] and :meth:`attend`."""

    def __init__(self, segments: torch.Tensor, compiled: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, T = segments.shape

        def same_segment_causal(b, h, q, kv):
            return (segments[b, q] == segments[b, kv]) & (q >= kv)

        self.block_mask = create_block_mask(same_segment_causal, B, None, T, T,
                                            device=segments.device)
        self._flex = _compiled_flex() if compiled else flex_attention

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._flex(q, k, v, block_mask=self.block_mask)


_flex_compiled = None


def _compiled_flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def use_document_masking(model: torch.nn.Module, compiled: bool = True) -> None:
    """Packed rows of ``model`` (a GPT) attend through FlexAttention from now on (``compiled``:
    its compiled kernel, the fast one; else its reference implementation). No dropout: flex
    attention has none (ValueError)."""
    if model.config.dropout:
        raise ValueError("FlexAttention has no attention dropout: train with --dropout 0 or "
                         "--packed_attention dense")
    model.segment_mask = lambda segments: DocumentMask(segments, compiled)


def use_dense_masking(model: torch.nn.Module) -> None:
    model.segment_mask = None

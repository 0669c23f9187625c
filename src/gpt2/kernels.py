"""Opt-in CPU decoding kernels, swapped into a model from outside (the model file has none).

    with decode_kernels(model):          # what the sampling module does around a decode loop
        logits = model(token, past=past, use_cache=True)

On the CPU, inference with few rows (decoding: one row per sequence) runs oneDNN's matmul,
the kernel PyTorch ships for its compiler: 1.2-2.5x ATen's sgemm for 1-64 rows, slower from
~256 rows (``bench/micro.py linear``). The swap changes each plain ``nn.Linear``'s class for the
duration of the block (same parameters, same names, no copies); results differ from sgemm by
fp32 rounding only. Set ``ONEDNN_MAX_ROWS = 0`` to keep ATen's kernels everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN_MAX_ROWS = 64
_onednn: bool | None = None  # None: not probed yet


def onednn_available() -> bool:
    """Whether this build and CPU run oneDNN's matmul and agree with F.linear (probed once)."""
    global _onednn
    if _onednn is None:
        try:
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            _onednn = torch.backends.mkldnn.is_available() and torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
        except Exception:  # a build without the op, or a CPU it does not support
            _onednn = False
    return _onednn


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` that takes oneDNN's matmul for small fp32 batches without gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and type(w) in (nn.Parameter, torch.Tensor)
                and x.numel() <= ONEDNN_MAX_ROWS * x.size(-1)
                and not torch.is_autocast_enabled("cpu")):
            return onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``F.linear`` through oneDNN (the op inductor emits for CPU linear layers)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def decode_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Swap the CPU decoding kernels into ``model`` for the block, then swap them back."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    swapped = []
    if on_cpu and ONEDNN_MAX_ROWS > 0 and onednn_available():
        swapped = [m for m in model.modules() if type(m) is nn.Linear]
    for m in swapped:
        m.__class__ = OneDNNLinear
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.Linear

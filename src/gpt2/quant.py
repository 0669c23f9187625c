"""int8 weights for inference: ``--dtype int8`` of sample, interact, generate, evaluate, chat
and serve.

    model = quantize_int8(load_model("models/124M"))       # in place; returns the model

Every linear layer of the blocks and the head becomes :class:`Int8Linear`: its weight rounded
to int8 with one scale per output channel (symmetric, max |w| -> 127); the embeddings and the
layer norms stay as they are (the head's int8 copy is separate from the fp32 token table it is
tied to). The matmuls run in PyTorch's own int8 kernels, never one of ours:

- CPU: FBGEMM's dynamically quantized linear (``quantized::linear_dynamic``), which also
  rounds each input to 8 bits (one scale per call, from its range) and accumulates in int32;
  on a CPU decoding one token at a time, where reading the weights is the cost, it reads a
  quarter of the bytes of fp32;
- CUDA, MPS and others: ``aten._weight_int8pack_mm`` (weight-only: the input stays in its
  dtype); where it has no kernel, the dequantized weight (correct, not faster).

Applied from outside the model (the model module has no precision branches), like compile and
DDP. ``Int8Linear.weight`` is the dequantized weight, for code that reads a layer's weight
directly (the chunked loss reads the head's).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp32 scales [N]): symmetric, max |w| of each output row -> 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (see the module docstring); inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = _per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self._packed = None
        if q.device.type == "cpu":
            with warnings.catch_warnings():  # quantized tensors are deprecated; the op is not
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(
                    q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qt, bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu":
            y = torch.ops.quantized.linear_dynamic(x.float().reshape(-1, x.size(-1)),
                                                   self._packed, True)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        rows = x.reshape(-1, x.size(-1)).contiguous()  # (some kernels index it as dense)
        try:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(x.dtype))
        except (NotImplementedError, RuntimeError):  # no int8 kernel for this device or dtype
            y = F.linear(rows, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the blocks' linear layers and the head with :class:`Int8Linear`, in place.
    Call it on the model on its device, in eval mode; returns the model."""
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.lm_head = Int8Linear(model.lm_head)
    return model.eval().requires_grad_(False)

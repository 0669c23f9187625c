"""int8 weights for inference: ``--dtype int8`` of sample, interact, generate, evaluate, chat
and serve.

    model = quantize_int8(load_model("models/124M"))       # in place; returns the model

Every linear layer of the blocks and the head becomes :class:`Int8Linear`: its weight rounded
to int8 with one scale per output channel (symmetric, max |w| -> 127); the embeddings and the
layer norms stay as they are (the head's int8 copy is separate from the fp32 token table it is
tied to). The matmuls run in PyTorch's own int8 kernels, never one of ours, chosen once when
the layer is built (:func:`int8_kernel`):

- ``fbgemm`` (CPU): FBGEMM's dynamically quantized linear (``quantized::linear_dynamic``,
  behind ``torch.ops.gpt2.int8_linear`` so that a compiled decode step calls it as it is),
  which also rounds each input to 8 bits (one scale per call, from its range) and accumulates
  in int32; decoding one token at a time, where reading the weights is the cost, it reads a
  quarter of the bytes of fp32 (``bench/cpu_inference.py``: 4-7x faster than the weight-only
  kernel below on this CPU, and than Inductor's dequantize-and-multiply pattern);
- ``int8pack`` (CUDA): ``aten._weight_int8pack_mm``, weight-only (the input stays in its dtype);
- ``dequantize`` (where neither runs): the weight dequantized per call (correct, not faster).

No fp32 copy of a weight is kept; :meth:`Int8Linear.dequantized` builds one on request (what a
full-vocabulary loss over the head needs). Applied from outside the model (the model module has
no precision branches), like compile and DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import pack_int8

KERNELS = ("fbgemm", "int8pack", "dequantize")
_probed: dict[tuple[str, torch.dtype], bool] = {}


def _per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp32 scales [N]): symmetric, max |w| of each output row -> 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _int8pack_runs(device: torch.device) -> bool:
    """Whether ``aten._weight_int8pack_mm`` has a kernel on this device (probed once each)."""
    key = (device.type, torch.float32)
    if key not in _probed:
        try:
            x = torch.ones(1, 32, device=device)
            q = torch.ones(8, 32, dtype=torch.int8, device=device)
            y = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, device=device))
            _probed[key] = bool(torch.all(y == 32))
        except (NotImplementedError, RuntimeError):  # no kernel here: known, not hidden later
            _probed[key] = False
    return _probed[key]


def int8_kernel(device: torch.device | str) -> str:
    """The int8 matmul a layer on ``device`` uses (one of :data:`KERNELS`)."""
    device = torch.device(device)
    if device.type == "cpu" and torch.backends.quantized.engine in ("fbgemm", "x86"):
        return "fbgemm"
    if device.type != "cpu" and _int8pack_runs(device):
        return "int8pack"
    return "dequantize"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (see the module docstring); inference only."""

    def __init__(self, linear: nn.Linear, kernel: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = _per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.kernel = int8_kernel(q.device) if kernel is None else kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        self.handle = pack_int8(self, q, scales, bias) if self.kernel == "fbgemm" else -1

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight these int8 values and scales stand for (a new tensor each call)."""
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            return torch.ops.gpt2.int8_linear(x, self.qweight, self.handle)
        rows = x.reshape(-1, x.size(-1)).contiguous()  # (the kernel indexes it as dense)
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(x.dtype))
        else:
            y = F.linear(rows, self.dequantized().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                f"kernel={self.kernel}")


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


def head_weight(model: nn.Module) -> torch.Tensor:
    """The head's weight as a tensor, for a loss over the whole vocabulary: the parameter
    itself, or an int8 head's dequantized copy (made once per call of this)."""
    head = model.lm_head
    return head.dequantized() if isinstance(head, Int8Linear) else head.weight

"""Opt-in CPU decoding kernels, swapped into a model from outside (the model file has none).

    with decode_kernels(model):          # what the sampling module does around a decode loop
        logits = model(token, past=past, use_cache=True)

On the CPU, inference with few rows (decoding: one row per sequence) runs oneDNN's matmul,
the kernel PyTorch ships for its compiler: 1.2-2.5x ATen's sgemm for 1-64 rows, slower from
~256 rows (``bench/micro.py linear``). The swap changes each plain ``nn.Linear``'s class for the
duration of the block (same parameters, same names, no copies); results differ from sgemm by
fp32 rounding only. Set ``ONEDNN_MAX_ROWS = 0`` to keep ATen's kernels everywhere.

The kernels are registered as operators (``torch.ops.gpt2.onednn_linear``,
``torch.ops.gpt2.int8_linear``) so that a compiled decode step (:mod:`gpt2.capture`) calls them
as they are: Inductor would otherwise lower a linear layer to MKL's packed sgemm (slower at one
row here) or need the weights frozen into the graph, and cannot trace FBGEMM's packed weights.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
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
            return torch.ops.gpt2.onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``F.linear`` through oneDNN (the op inductor emits for CPU linear layers)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _out_like(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (rows,))


# Operators, defined once per process, with a shape function for tracing (no Python wrapper
# of torch.library.custom_op: a decode step calls them ~50 times a token).
_lib = torch.library.Library("gpt2", "DEF")
_lib.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.impl("onednn_linear", lambda x, w, b: onednn_linear(x, w, b), "CPU")
_lib.impl("onednn_linear", lambda x, w, b: _out_like(x, w.size(0)), "Meta")
_lib.define("int8_linear(Tensor x, Tensor qweight, int handle) -> Tensor")

# FBGEMM's packed int8 weights by handle: an operator takes tensors and numbers, not the packed
# object, so Int8Linear registers its own and passes the handle (dropped with the layer).
_packed: dict[int, object] = {}
_handles = itertools.count()


def pack_int8(owner: object, qweight: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None) -> int:
    """Pack per-channel int8 weights for FBGEMM's dynamic linear; the handle for
    ``torch.ops.gpt2.int8_linear`` lives as long as ``owner``."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; the op is not
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(
            qweight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qt, bias)
    handle = next(_handles)
    _packed[handle] = packed
    weakref.finalize(owner, _packed.pop, handle, None)
    return handle


_linear_dynamic = torch.ops.quantized.linear_dynamic.default
# An operator called from Python looks for __torch_function__ on each argument; on FBGEMM's
# packed weights (a ScriptObject) that lookup fails in C++ and costs ~11 us, twice the kernel's
# own overhead, ~50 times a token. Plain tensors and a packed object need no such check here.
_no_torch_function = torch._C.DisableTorchFunctionSubclass


def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, handle: int) -> torch.Tensor:
    with _no_torch_function():
        if x.dtype == torch.float32:  # the decoding case: nothing around the kernel
            return _linear_dynamic(x, _packed[handle], True)
        return _linear_dynamic(x.float(), _packed[handle], True).to(x.dtype)


_lib.impl("int8_linear", _int8_linear, "CPU")
_lib.impl("int8_linear", lambda x, q, handle: _out_like(x, q.size(0)), "Meta")


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

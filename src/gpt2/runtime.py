"""Where and how a model runs: the ``--device`` rule and the one precision vocabulary.

    device = pick_device("auto")                  # this process's GPU if there is one, else cpu
    precision = resolve_precision("auto", device) # bf16 on a GPU that has it, else fp32
    with autocast(device, precision):             # fp32: no autocast at all
        logits = model(tokens)

Precisions are ``fp32``, ``bf16`` and ``fp16`` everywhere (training, evaluation, serving,
``load_model(dtype=...)``); training also takes ``auto``.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    """A precision name (fp32, bf16, fp16) or a torch dtype -> torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(PRECISIONS)}")
    return DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32 (CPU autocast is slower than fp32).

    Refuses bf16 on a GPU without it, in one line.
    """
    if precision == AUTO:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if precision not in DTYPES:
        raise UserError(f"--precision must be one of {', '.join((AUTO,) + PRECISIONS)}, "
                        f"got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for a forward pass (and its backward); fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or None): this rank's GPU if there is one, else the CPU. One rule for every
    command's ``--device``; a device this machine lacks is a one-line error."""
    if name in (None, AUTO):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)"
                        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                            "GPU(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS (Apple GPU) is not available in this "
                            "build of torch or on this machine")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu, cuda and mps devices are supported")
    return device


# glibc's mallopt parameter for the size from which allocations get their own mmap.
_M_MMAP_THRESHOLD = -3


def return_large_frees(threshold: int = 4 << 20) -> bool:
    """Make glibc give blocks of ``threshold`` bytes or more back to the OS when freed (for a
    long-lived CPU process whose big tensors keep changing size: the server's KV caches).

    By default glibc raises its mmap threshold as big blocks are freed, after which they come
    from the heap and its free space is kept: 64 streaming clients on 124M grew the server from
    1.45 to 1.87 GB in 10 minutes, and with a fixed 4 MiB threshold stayed at 1.18-1.20 GB
    at the same speed (bench/RESULTS.md, Serve). A ``MALLOC_MMAP_THRESHOLD_`` the user set
    wins. Returns whether the setting was made (False: not glibc, or left to the user).
    """
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1

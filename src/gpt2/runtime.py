"""Where and how a model runs: every device choice, the one precision vocabulary, autocast.

    device = pick_device("auto")                  # this rank's accelerator, else the cpu
    precision = resolve_precision("auto", device) # bf16 where the device has it, else fp32
    with autocast(device, precision):             # fp32: no autocast at all
        logits = model(tokens)
    backend_of(device).collective                 # nccl, xccl, tpu or gloo

Every difference between devices lives in :data:`BACKENDS`, one row per device type, and is
reached through PyTorch's own device-generic API (``torch.accelerator``, ``torch.autocast``,
``torch.compile``, ``torch.distributed``): nothing here talks to a device any other way.

=====  =====================  ==============  ========  =======  ===========================
type   what                   precisions      auto      compile  data parallel (collective)
=====  =====================  ==============  ========  =======  ===========================
cpu    the CPU                fp32 bf16 fp16  fp32      off      Gloo
cuda   NVIDIA / AMD GPUs      fp32 bf16 fp16  bf16 [1]  on       NCCL (RCCL on ROCm)
xpu    Intel GPUs             fp32 bf16 fp16  bf16 [1]  on       XCCL
mps    Apple GPUs             fp32 bf16 fp16  fp32      off [2]  one process only
tpu    Google TPUs (TorchTPU) fp32 bf16       bf16      on       TorchTPU's ``tpu`` backend
=====  =====================  ==============  ========  =======  ===========================

[1] fp32 on a GPU without bfloat16 (refused there as ``--precision bf16``). [2] Inductor's MPS
code generation is a prototype: ``--compile`` turns it on.

TorchTPU (``pip install 'gpt2[tpu]'``) is a PyTorch backend that torch loads by itself at
``import torch`` on a machine with TPUs: it registers the ``tpu`` device, the ``tpu``
torch.compile backend and the ``tpu`` process-group backend, which DDP and FSDP2 use.

Precisions are ``fp32``, ``bf16`` and ``fp16`` everywhere (training, evaluation, serving,
``load_model(dtype=...)``); training also takes ``auto``, and running a model (``--dtype``,
:data:`WEIGHT_DTYPES`) also ``int8``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch

from .errors import UserError
from .files.memory import return_large_frees  # noqa: F401 (its old home)

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The weights' types a model can be run in (--dtype): the precisions, and int8 (gpt2.quant).
WEIGHT_DTYPES = PRECISIONS + ("int8",)


def parse_dtype(dtype) -> torch.dtype | None:
    """A precision name (fp32, bf16, fp16) or a torch dtype -> torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(PRECISIONS)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Backend:
    """What differs between kinds of device, in one place (see the module docstring)."""

    type: str                   # torch.device(...).type
    what: str                   # for messages
    install: str                # what makes it available, said when it is not
    precisions: tuple[str, ...]
    auto: str                   # --precision auto (bf16 falls back to fp32 without bfloat16)
    collective: str | None      # torch.distributed backend; None: one process only
    compile_backend: str        # torch.compile(backend=...)
    compile_by_default: bool
    fused_optimizer: bool       # torch's fused Adam/AdamW kernels run there
    flex_training: bool = False  # FlexAttention trains there (the CPU: no backward, torch 2.13)
    float64: bool = True        # float64 tensors exist there (MPS has none)


BACKENDS = {b.type: b for b in (
    Backend("cpu", "the CPU", "", PRECISIONS, "fp32", "gloo", "inductor", False, True),
    Backend("cuda", "an NVIDIA or AMD GPU (CUDA/ROCm)",
            "a CUDA (or ROCm) build of torch and a GPU driver: see https://pytorch.org",
            PRECISIONS, "bf16", "nccl", "inductor", True, True, flex_training=True),
    Backend("xpu", "an Intel GPU (XPU)",
            "a torch build with XPU support: pip install torch --index-url "
            "https://download.pytorch.org/whl/xpu", PRECISIONS, "bf16", "xccl", "inductor",
            True, True),
    Backend("mps", "an Apple GPU (MPS)", "macOS 12.3+ on Apple silicon and torch's macOS build",
            PRECISIONS, "fp32", None, "inductor", False, True, float64=False),
    Backend("tpu", "a Google TPU (TorchTPU)",
            "TorchTPU on a TPU VM: pip install 'gpt2[tpu]'", ("fp32", "bf16"), "bf16", "tpu",
            "tpu", True, False),
)}


def backend_of(device: torch.device) -> Backend:
    return BACKENDS[device.type]


def widest_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it, else float32 (for sums that must not lose ids)."""
    backend = BACKENDS.get(device.type)
    return torch.float64 if backend is None or backend.float64 else torch.float32


def _accelerator() -> torch.device | None:
    """The accelerator torch found on this machine (at most one kind), or None."""
    return torch.accelerator.current_accelerator(check_available=True)


def device_count(device_type: str) -> int:
    """How many devices of this type this process can use (1 for the CPU)."""
    if device_type == "cpu":
        return 1
    acc = _accelerator()
    return torch.accelerator.device_count() if acc is not None and acc.type == device_type else 0


def _missing(name: str, device_type: str) -> UserError:
    backend = BACKENDS[device_type]
    if device_type == "tpu" and importlib.util.find_spec("torch_tpu") is not None:
        why = "TorchTPU is installed but found no TPU on this machine"
    else:
        why = f"{backend.what} is not available in this build of torch or on this machine " \
              f"(it needs {backend.install})"
    acc = _accelerator()
    here = "cpu" + (f" and {acc.type} ({torch.accelerator.device_count()})" if acc else "")
    return UserError(f"--device {name}: {why}; devices here: {here}")


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or None): this rank's accelerator if there is one, else the CPU. One rule for
    every command's ``--device``; a device this machine or this torch lacks is a one-line error
    that says what to install."""
    if name in (None, AUTO):
        acc = _accelerator()
        if acc is None or acc.type not in BACKENDS:
            return torch.device("cpu")
        name = acc.type
    kind = str(name).split(":")[0]
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        if kind in BACKENDS:  # a type torch has not registered: its backend is not loaded
            raise _missing(name, kind) from None
        raise UserError(f"--device {name!r} is not a torch device (try "
                        f"{', '.join(BACKENDS)}, or cuda:1)") from None
    if device.type not in BACKENDS:
        raise UserError(f"--device {name}: only {', '.join(BACKENDS)} devices are supported")
    if device.type == "cpu":
        return device
    count = device_count(device.type)
    if count == 0:
        raise _missing(name, device.type)
    if device.index is None:
        return torch.device(device.type, local_rank % count)
    if device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device(s)")
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` this process's current device (NCCL and friends need it set)."""
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); nothing on the CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _has_bf16(device: torch.device) -> bool:
    if device.type in ("cpu", "tpu"):  # (a TPU computes in bfloat16)
        return True
    if device.type == "mps":  # Metal has bfloat16 from macOS 14 on
        return torch.backends.mps.is_macos_or_newer(14, 0)
    check = getattr(torch.get_device_module(device.type), "is_bf16_supported", None)
    return bool(check()) if check is not None else True


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> the device's default (bf16 where it has bfloat16; fp32 on the CPU, where autocast
    is slower than fp32). A precision the device lacks is refused in one line."""
    backend = backend_of(device)
    if precision == AUTO:
        return backend.auto if backend.auto != "bf16" or _has_bf16(device) else "fp32"
    if precision not in DTYPES:
        raise UserError(f"--precision must be one of {', '.join((AUTO,) + PRECISIONS)}, "
                        f"got {precision!r}")
    if precision not in backend.precisions:
        raise UserError(f"--precision {precision}: not supported on {backend.what}; use one of "
                        f"{', '.join(backend.precisions)}")
    if precision == "bf16" and not _has_bf16(device):
        raise UserError(f"--precision bf16: this {device.type} device does not support "
                        "bfloat16; use fp16")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for a forward pass (and its backward); fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def compile_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile with the device's backend (TorchTPU's ``tpu``, Inductor elsewhere)."""
    return torch.compile(module, backend=backend_of(device).compile_backend)


def collective_backend(device: torch.device) -> str:
    """The torch.distributed backend for processes on ``device``; one line where there is none."""
    backend = backend_of(device)
    if backend.collective is None:
        raise UserError(f"--device {device.type}: torch.distributed has no backend for "
                        f"{backend.what}; run one process (or train on the CPU or a GPU)")
    return backend.collective


def device_rng_state() -> dict[str, list[torch.Tensor]]:
    """The accelerator's RNG states (one per device), keyed by its type; {} without one."""
    acc = _accelerator()
    if acc is None:
        return {}
    module = torch.get_device_module(acc.type)
    if hasattr(module, "is_initialized") and not module.is_initialized():
        return {}  # nothing drew from it yet (and asking would start it)
    if hasattr(module, "get_rng_state_all"):
        return {acc.type: list(module.get_rng_state_all())}
    return {acc.type: [module.get_rng_state()]}


def set_device_rng_state(states: dict[str, list[torch.Tensor]]) -> None:
    """Restore :func:`device_rng_state` where the same kind and number of devices are here."""
    acc = _accelerator()
    saved = states.get(acc.type) if acc is not None else None
    if not saved:
        return
    module = torch.get_device_module(acc.type)
    if hasattr(module, "set_rng_state_all") and len(saved) == torch.accelerator.device_count():
        module.set_rng_state_all(saved)
    elif len(saved) == 1 and not hasattr(module, "set_rng_state_all"):
        module.set_rng_state(saved[0])


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError on an accelerator, or the CPU
    allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def failed_allocation(e: BaseException) -> str | None:
    """How much the failed allocation asked for, as the allocator said it (None: unsaid)."""
    import re

    m = re.search(r"tried to allocate (\d+) bytes", str(e), re.IGNORECASE)
    if m:
        return f"{int(m.group(1)) / 1e9:.2f} GB"
    m = re.search(r"tried to allocate ([\d.]+ [KMGT]i?B)", str(e), re.IGNORECASE)
    return m.group(1) if m else None


def max_memory_allocated(device: torch.device) -> int | None:
    """Bytes: the allocator's peak since :func:`reset_peak_memory`; None on the CPU."""
    return None if device.type == "cpu" else torch.accelerator.max_memory_allocated(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.empty_cache()
        torch.accelerator.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device has free (None where torch cannot say, and for the CPU)."""
    if device.type == "cpu":
        return None
    try:
        return int(torch.accelerator.get_memory_info(device)[0])
    except (RuntimeError, NotImplementedError, AttributeError):
        return None

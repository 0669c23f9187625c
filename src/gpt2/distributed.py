"""Distributed setup: which process am I, how many are we, and the torch.distributed group.

Every launcher says the same three things in its own words; :func:`launcher_env` reads them:

- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
- Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``;
- MPICH / Intel MPI (PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``;
- Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``.

:func:`init` then starts ``torch.distributed`` (NCCL on GPUs, Gloo on CPU) with a timeout, so a
rank that dies makes the others fail with a message instead of waiting forever. Communication
is always torch.distributed's (or Horovod's in ``train-horovod.py`` when it is installed); there
is no home-made layer here.

    dist_info = init("auto")          # single process: no process group, rank 0 of 1
    if dist_info.is_main: print(...)
    ...
    shutdown()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

# (rank, world size, local rank) variable names per launcher, most specific first.
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}

DEFAULT_PORT = "29500"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launcher_env(environ=None) -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, launcher) from the environment; (0, 1, 0, 'none') alone."""
    environ = os.environ if environ is None else environ
    for launcher, (rank, size, local) in _LAUNCHERS.items():
        if rank in environ and size in environ:
            try:
                r, n = int(environ[rank]), int(environ[size])
                lr = int(environ.get(local, r))
            except ValueError:
                raise UserError(f"{launcher} environment: {rank}/{size} are not integers") from None
            # srun without several tasks (e.g. an allocation's shell) is not a distributed run
            if n > 1 or launcher == "torchrun":
                return r, n, lr, launcher
    return 0, 1, 0, "none"


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or None): this rank's GPU if there is one, else the CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)"
                        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _master_addr(environ, launcher: str) -> str:
    if "MASTER_ADDR" in environ:
        return environ["MASTER_ADDR"]
    # Slurm tells every task where srun was started; MPI launchers say nothing, so a multi-node
    # mpirun needs `-x MASTER_ADDR=<first node>` (the README shows it).
    if launcher == "slurm" and "SLURM_LAUNCH_NODE_IPADDR" in environ:
        return environ["SLURM_LAUNCH_NODE_IPADDR"]
    return "127.0.0.1"


def init(device: str | None = "auto", timeout_minutes: float = 10.0, environ=None) -> DistInfo:
    """Start torch.distributed when launched with several processes; else a one-process DistInfo."""
    environ = os.environ if environ is None else environ
    rank, world_size, local_rank, launcher = launcher_env(environ)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistInfo(0, 1, 0, launcher, dev)
    os.environ.setdefault("MASTER_ADDR", _master_addr(environ, launcher))
    os.environ.setdefault("MASTER_PORT", environ.get("MASTER_PORT", DEFAULT_PORT))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world_size, local_rank, launcher, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Leave together: a Gloo rank that tears its sockets down while a peer is still between
        # its last collective and its own teardown can abort that peer ("terminate called").
        try:
            dist.barrier()
        except Exception:  # a peer already gone: nothing left to wait for
            pass
        dist.destroy_process_group()


# --- Horovod (train-horovod.py when horovod.torch is installed; UNTESTED here: Horovod 0.28.1
# does not build against current PyTorch, see NOTES.md). Its ops stand in for the collectives.

def init_horovod(hvd, device: str | None = "auto") -> DistInfo:
    """hvd.init(), this rank's GPU pinned by local rank, and the matching DistInfo."""
    hvd.init()
    dev = pick_device(device, hvd.local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(hvd.rank(), hvd.size(), hvd.local_rank(), "horovod", dev)


def horovod_optimizer(optimizer, model: torch.nn.Module, accumulation: int):
    """Horovod's averaging optimizer, started from rank 0's weights and optimizer state."""
    import horovod.torch as hvd

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         backward_passes_per_step=accumulation)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    return optimizer


def _hvd():
    import horovod.torch as hvd

    return hvd


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of a number over every rank (the number itself in a one-process run)."""
    if not info.enabled:
        return value
    if info.launcher == "horovod":
        return _hvd().allreduce(torch.tensor([value], dtype=torch.float64), op=_hvd().Average).item()
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any: e.g. 'a stop was requested', so all stop together."""
    if not info.enabled:
        return flag
    if info.launcher == "horovod":
        return bool(_hvd().allreduce(torch.tensor([int(flag)]), op=_hvd().Max).item())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object on every rank (e.g. a randomly drawn seed)."""
    if not info.enabled:
        return obj
    if info.launcher == "horovod":
        return _hvd().broadcast_object(obj, root_rank=0)
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    if info.launcher == "horovod":
        return _hvd().allgather_object(obj)
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        _hvd().barrier() if info.launcher == "horovod" else dist.barrier()


def lost_contact_message(info: DistInfo, exc: BaseException) -> str:
    """One line for a collective that failed because another rank died or stopped answering."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 200:
        first = first[:200] + "..."
    return f"rank {info.rank}: lost contact with other ranks ({first})"

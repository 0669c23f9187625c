"""Distributed setup: which process am I, how many are we, and the torch.distributed group.

Every launcher says the same three things in its own words; :func:`launcher_env` reads them:

- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
- Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``;
- MPICH / Intel MPI (PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``;
- Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``.

:func:`init` then starts ``torch.distributed`` (the device's backend, :mod:`gpt2.runtime`:
NCCL on NVIDIA GPUs, XCCL on Intel's, TorchTPU's on TPUs, Gloo on the CPU) with a timeout, so a
rank that dies makes the others fail with a message instead of waiting forever. Communication
is always torch.distributed's (or Horovod's in ``train-horovod.py`` when it is installed); there
is no home-made layer here.

    with process_group("auto", timeout_minutes=10) as info:   # one process: rank 0 of 1
        if info.is_main: print(...)
        with rank_zero_first(info): ...       # rank 0 fills a shared cache, then the others
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
# torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is first
# imported, and wrapping a model in DDP or FSDP imports it (through torch._dynamo and
# torch.distributed.fsdp). Imported after init_process_group, those defaults would hold the live
# group, which destroy_process_group() then cannot free: its Gloo threads and sockets would live
# on into the interpreter's teardown and now and then abort it. Imported here, before any group
# exists, the defaults are None.
import torch.distributed.nn  # noqa: F401

from ..errors import UserError
from ..runtime import collective_backend, pick_device, use_device

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
    use_device(dev)
    if world_size == 1:
        return DistInfo(0, 1, 0, launcher, dev)
    backend = collective_backend(dev)
    os.environ.setdefault("MASTER_ADDR", _master_addr(environ, launcher))
    os.environ.setdefault("MASTER_PORT", environ.get("MASTER_PORT", DEFAULT_PORT))
    if backend == "gloo":
        _check_gloo_address(environ, rank, world_size)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world_size, local_rank, launcher, dev)


# How many processes run on this machine, per launcher: fewer than the world means several hosts.
_LOCAL_SIZE = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
               "SLURM_NTASKS_PER_NODE")


def _several_hosts(environ, world_size: int) -> bool:
    if environ.get("SLURM_NNODES", "1").isdigit() and int(environ.get("SLURM_NNODES", "1")) > 1:
        return True
    for name in _LOCAL_SIZE:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value) < world_size
    return False


def _check_gloo_address(environ, rank: int, world_size: int) -> None:
    """Gloo offers its peers the address this machine's hostname resolves to. Where that is a
    loopback address (Debian's 127.0.1.1, a container's /etc/hosts), ranks on other machines
    can never connect, and torch prints some 60 lines of retries: say so in one line first."""
    if environ.get("GLOO_SOCKET_IFNAME") or not _several_hosts(environ, world_size):
        return
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return
    if ipaddress.ip_address(address).is_loopback:
        raise UserError(f"rank {rank}: this machine's hostname {name!r} resolves to {address}, "
                        "a loopback address the other machines cannot reach: set "
                        "GLOO_SOCKET_IFNAME to the network interface that reaches them (e.g. "
                        "GLOO_SOCKET_IFNAME=eth0; NCCL_SOCKET_IFNAME on GPUs), or map the "
                        "hostname to that interface's address in /etc/hosts")


def shutdown() -> None:
    """Leave the process group: all ranks together, with nothing left that holds the group."""
    if dist.is_available() and dist.is_initialized():
        # Leave together: a Gloo rank that tears its sockets down while a peer is still between
        # its last collective and its own teardown can abort that peer ("terminate called").
        try:
            dist.barrier()
        except Exception:  # a peer already gone: nothing left to wait for
            pass
        release_group_holders()
        dist.destroy_process_group()


# The attributes through which torch's wrappers hold a process group, by class (torch's own
# pickling of each drops the same ones): DDP's C++ reducer (and the logger holding it) and its
# group; a DeviceMesh's groups (DTensor, FSDP2); FSDP2's per-module mesh information.
_GROUP_HOLDERS = {
    "DistributedDataParallel": ("logger", "reducer", "process_group"),
    "DeviceMesh": ("_pg_registry",),
    "DataParallelMeshInfo": ("shard_process_group", "replicate_process_group",
                             "reduce_scatter_process_group"),
}


def release_group_holders() -> None:
    """Make every wrapper let go of the process group, so that destroy_process_group() frees
    the group here and now, from Python, whoever still holds the wrappers.

    From Python the group's destructor releases the GIL before it joins Gloo's worker threads.
    Freed from C++ instead, by a DDP reducer that outlived the group, it joins them with the GIL
    held, while a worker dropping a finished all-reduce needs the GIL to release what that work
    captured (its ``ThreadLocalState``): a deadlock, 4 runs in 12 of the DDP gradient test
    (main thread: ``~Reducer -> ~ProcessGroupGloo -> thread::join``; worker:
    ``~AsyncAllreduceWork -> ~ThreadLocalState -> gil_scoped_acquire``). Freed during the
    interpreter's teardown (a mesh or DTensor cache that outlived the group), it now and then
    aborts a finished rank ("terminate called without an active exception", exit 134).

    A wrapper outlives the group when a traceback, a caller's variable or a reference cycle
    keeps it; after this it cannot communicate. Also cleared: DTensor's process-wide caches
    (sharding decisions, redistribution plans, mesh topologies in torch's C++ fast path, Python
    lru_caches and the planner cache), which hold DeviceMeshes.
    """
    import functools
    import gc

    gc.collect()  # a wrapper in a reference cycle: freed now, while the group is registered
    dtensor = "torch.distributed.tensor" in sys.modules  # else no FSDP2 ran: nothing cached
    if dtensor:
        clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
        if clear_fast_path is not None:
            clear_fast_path()
        try:
            from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
        except ImportError:  # another torch: the scan below still clears its lru_caches
            pass
        else:
            clear_redistribute_planner_cache()
    lru_type = type(functools.lru_cache(None)(lambda: None))
    for obj in gc.get_objects():
        if dtensor and type(obj) is lru_type:
            if str(getattr(obj, "__module__", "")).startswith("torch.distributed.tensor"):
                obj.cache_clear()
            continue
        # (the class's own name, not isinstance: DDP is an ABC, whose hooks warn on odd objects)
        for cls in type(obj).__mro__:
            names = _GROUP_HOLDERS.get(cls.__name__)
            if names and cls.__module__.startswith("torch.") and hasattr(obj, "__dict__"):
                for name in names:
                    obj.__dict__.pop(name, None)
    gc.collect()  # what the caches held is in reference cycles (specs, meshes, schemas)


class CommError(RuntimeError):
    """A collective failed: another rank died, hung past --dist_timeout or hung up."""


def is_comm_error(e: BaseException) -> bool:
    """torch's own DistError types (store, network, backend), or ours from :func:`collective`."""
    return isinstance(e, (CommError, dist.DistError))


@contextlib.contextmanager
def collective(info: DistInfo) -> Iterator[None]:
    """A block whose communication may fail because of another rank: raises CommError then.

    Gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer"), so the type
    is given here, where the code knows it is communicating: our collectives below, and the
    forward/backward of a DDP- or FSDP-wrapped model (see gpt2.training.parallelize). Memory
    errors stay what they are.
    """
    try:
        yield
    except (torch.OutOfMemoryError, CommError):
        raise
    except RuntimeError as e:
        if not info.enabled:
            raise
        raise CommError(str(e)) from e


@contextlib.contextmanager
def process_group(device: str | None, timeout_minutes: float, info: DistInfo | None = None
                  ) -> Iterator[DistInfo]:
    """Join the launcher's process group for the block (``info``: one set up by the caller).

    A communication failure becomes one line naming this rank; the group is shut down on
    every way out.
    """
    own = info is None
    info = info or init(device, timeout_minutes)
    try:
        yield info
    except Exception as e:
        if info.enabled and is_comm_error(e):
            raise UserError(lost_contact_message(info, e)) from None
        raise
    finally:
        if own:
            shutdown()


@contextlib.contextmanager
def rank_zero_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. encoding into a shared cache), the others after it."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


# --- Horovod (train-horovod.py when horovod.torch is installed; UNTESTED here: Horovod 0.28.1
# does not build against current PyTorch, see NOTES.md). Its ops stand in for the collectives.

def init_horovod(hvd, device: str | None = "auto") -> DistInfo:
    """hvd.init(), this rank's GPU pinned by local rank, and the matching DistInfo."""
    hvd.init()
    dev = pick_device(device, hvd.local_rank())
    use_device(dev)
    return DistInfo(hvd.rank(), hvd.size(), hvd.local_rank(), "horovod", dev)


def wrap_optimizer(optimizer, model: torch.nn.Module, info: DistInfo, accumulation: int):
    """Horovod averages gradients in the optimizer; torch.distributed's wrappers already have."""
    if info.launcher == "horovod":
        return horovod_optimizer(optimizer, model, accumulation)
    return optimizer


def my_share(n: int, info: DistInfo) -> list[int]:
    """This rank's share of ``n`` items (every world_size-th). Every rank gets as many: indices
    >= n are padding the caller runs but counts zero, because under FSDP every forward is a
    collective (and the validation loop's stop check is one too)."""
    ws, rank = info.world_size, info.rank
    return list(range(rank, -(-n // ws) * ws, ws))


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
    with collective(info):
        if info.launcher == "horovod":
            t = torch.tensor([value], dtype=torch.float64)
            return _hvd().allreduce(t, op=_hvd().Average).item()
        t = torch.tensor([value], dtype=torch.float64, device=info.device)
        dist.all_reduce(t)
        return t.item() / info.world_size


def all_reduce_mean_tensor(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor (a loss, a few metrics) over every rank, elementwise, as float64 on
    its device; nothing waits for the device (the tensor itself in a one-process run)."""
    if not info.enabled:
        return value
    with collective(info):
        t = value.detach().double().reshape(-1)
        if info.launcher == "horovod":
            return _hvd().allreduce(t.cpu(), op=_hvd().Average).reshape(value.shape)
        dist.all_reduce(t)
        return (t / info.world_size).reshape(value.shape)


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any: e.g. 'a stop was requested', so all stop together."""
    if not info.enabled:
        return flag
    with collective(info):
        if info.launcher == "horovod":
            return bool(_hvd().allreduce(torch.tensor([int(flag)]), op=_hvd().Max).item())
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object on every rank (e.g. a randomly drawn seed)."""
    if not info.enabled:
        return obj
    with collective(info):
        if info.launcher == "horovod":
            return _hvd().broadcast_object(obj, root_rank=0)
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    with collective(info):
        if info.launcher == "horovod":
            return _hvd().allgather_object(obj)
        out = [None] * info.world_size
        dist.all_gather_object(out, obj)
        return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        with collective(info):
            _hvd().barrier() if info.launcher == "horovod" else dist.barrier()


def lost_contact_message(info: DistInfo, exc: BaseException) -> str:
    """One line for a collective that failed because another rank died or stopped answering."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 200:
        first = first[:200] + "..."
    return f"rank {info.rank}: lost contact with other ranks ({first})"

"""``./train-horovod.py``: train.py's flags and loop, for runs started by ``mpirun``.

    mpirun -np 4 -x MASTER_ADDR=node1 -x MASTER_PORT=29500 python train-horovod.py --dataset ...

With Horovod installed (``horovod.torch``) it uses Horovod: hvd.init, one GPU per local rank,
hvd.DistributedOptimizer averaging once per ``--accumulate_gradients`` micro-batches, and rank
0's weights and optimizer state broadcast at start. That path is untested here (Horovod 0.28.1
does not build against current PyTorch). Without Horovod, the same run goes through
torch.distributed, whose process group is set up from the MPI launcher's environment
(``OMPI_COMM_WORLD_*``, ``PMI_*`` or Slurm's) by gpt2.training.distributed.init.
"""

from __future__ import annotations

from ..training import distributed
from ..training.config import parse_config
from ..training.loop import train


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        import horovod.torch as hvd
    except ImportError:
        return train(cfg)  # torch.distributed from the launcher's environment
    return train(cfg, join=lambda: distributed.init_horovod(hvd, cfg.device))

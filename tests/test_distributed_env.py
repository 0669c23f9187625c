"""Which process am I: every launcher's environment read the same way."""

import pytest
import torch

from gpt2.training import distributed
from gpt2.errors import UserError


@pytest.mark.parametrize("environ, expected", [
    ({}, (0, 1, 0, "none")),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (3, 8, 1, "openmpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, (2, 4, 0, "pmi")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "slurm")),
    # a shell inside a Slurm allocation is one task, not a distributed run
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1, 0, "none")),
    # torchrun wins over the Slurm variables it runs inside
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "0",
      "SLURM_NTASKS": "1"}, (0, 2, 0, "torchrun")),
])
def test_launcher_env(environ, expected):
    assert distributed.launcher_env(environ) == expected


def test_bad_launcher_env():
    with pytest.raises(UserError, match="openmpi"):
        distributed.launcher_env({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})


def test_single_process_init_starts_no_group():
    info = distributed.init("cpu", environ={})
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    assert distributed.all_reduce_mean(2.5, info) == 2.5


def test_master_addr_defaults():
    assert distributed._master_addr({}, "openmpi") == "127.0.0.1"
    assert distributed._master_addr({"SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}, "slurm") == "10.0.0.7"
    assert distributed._master_addr({"MASTER_ADDR": "node1"}, "slurm") == "node1"

"""What several commands share: the sampling flags and their checks, the --dtype flag, a
random stream for sampling. Loading the model is :mod:`gpt2.io.inference`."""

from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..runtime import WEIGHT_DTYPES
from ..sampling import sampling_problem


def check_sampling_flags(args: argparse.Namespace) -> None:
    """--temperature, --top_k, --top_p: the checks of :func:`gpt2.sampling.check_params`."""
    problem = sampling_problem(args.temperature, args.top_k, args.top_p)
    if problem:
        raise UserError(f"--{problem}")


def add_dtype_argument(p: argparse.ArgumentParser, *names: str, dest: str = "dtype") -> None:
    """``--dtype``: the weights' type when sampling or scoring, int8 included."""
    p.add_argument(*(names or ("--dtype",)), dest=dest, choices=WEIGHT_DTYPES, default="fp32",
                   help="the weights' type: fp32, bf16, fp16, or int8 (per-channel int8 "
                        "weights of the blocks and head, PyTorch's int8 kernels; gpt2.quant)")


def generator_for(device: torch.device, seed: int | None) -> torch.Generator:
    """A random stream on ``device``: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator

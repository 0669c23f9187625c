"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from gpt2.model import GPT, GPTConfig


def make_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT in eval mode whose weights are perturbed away from the init (no zero biases or
    unit layer norms, which would hide a wrongly mapped tensor)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()

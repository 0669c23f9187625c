"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference next-token loss, written plainly with torch's cross-entropy: logits at
    positions 0..T-2 against tokens 1..T-1 (what the model's own loss must equal)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

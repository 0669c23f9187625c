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


def run_engine(engine, requests: list[tuple], timeout: float = 60) -> list:
    """The server's engine (gpt2.serve.engine) started, given ``requests`` ((prompt ids,
    Params, generator or None) each) at once, and stopped when all have ended: their Choices."""
    import threading

    from gpt2.serve.engine import Choice

    done = [threading.Event() for _ in requests]
    choices = [Choice(prompt, params, lambda e, d=d: e[0] in ("done", "error") and d.set(),
                      generator) for (prompt, params, generator), d in zip(requests, done)]
    engine.start()
    try:
        engine.submit(choices)
        assert all(d.wait(timeout) for d in done), "a request did not end in time"
    finally:
        engine.stop()
    return choices

"""``gpt2 train`` / ``./train.py``: fine-tune GPT-2 on your text, or train one from scratch.

    PYTHONPATH=src ./train.py --dataset my.txt --model_name 124M --max_steps 1000
    gpt2 train --config run.yaml --learning_rate 1e-4

Every flag is declared once, in :mod:`gpt2.training.config`; the loop is :mod:`gpt2.training.loop`.
"""

from __future__ import annotations

from ..training.config import parse_config
from ..training.loop import train


def main(argv: list[str] | None = None) -> int:
    return train(parse_config(argv))

"""Optional TensorBoard logging for ``train.py --tensorboard``.

metrics.jsonl stays the record of a run (``gpt2 plot`` draws it); TensorBoard gets the same
numbers for people who watch runs there. ``tensorboard`` is an optional dependency
(``pip install 'gpt2[tensorboard]'``), checked before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

# metrics.jsonl key -> TensorBoard tag
TAGS = {"loss": "loss/train", "avg": "loss/train_avg", "val_loss": "loss/val", "lr": "lr",
        "tokens_per_sec": "throughput/tokens_per_sec"}

EVAL_PREFIXES = ("hellaswag_", "lambada_")


def require() -> None:
    """One line instead of an ImportError when the package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: "
                        "pip install 'gpt2[tensorboard]' (or pip install tensorboard)") from None


class TensorBoardLog:
    """Scalars per step plus the training samples as text, in ``log_dir``.

    A resumed run starts at ``step``: events a stopped run wrote after its last checkpoint are
    purged (TensorBoard's purge_step), so every step shows once, as in metrics.jsonl.
    """

    def __init__(self, log_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step 0 also hides a replaced run's events (--restore_from fresh --overwrite).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1 if step else 0,
                                    flush_secs=30)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, tag in TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        evals = [key for key in record
                 if key.startswith(EVAL_PREFIXES) and not key.endswith("_examples")]
        for key in evals:  # --eval_tasks: hellaswag_acc_norm -> eval/hellaswag_acc_norm
            self.writer.add_scalar(f"eval/{key}", record[key], step)
        known = {*TAGS, *evals, "step", "tokens", "elapsed"}
        for key in record:  # an objective's metrics (rewards/margins, val_rewards/margins)
            if key not in known and not key.endswith("_examples"):
                tag = f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, record[key], step)
        if "val_loss" in record or evals:
            self.writer.flush()  # validation is rare and the number people wait for

    def samples(self, step: int, texts: list[str]) -> None:
        for i, text in enumerate(texts):
            # TensorBoard renders text as Markdown; a code block keeps the sample as written.
            self.writer.add_text(f"samples/{i + 1}", "```\n" + text.replace("```", "'''") + "\n```",
                                 step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

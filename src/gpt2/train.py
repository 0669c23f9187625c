"""``gpt2 train`` / ``./train.py``: fine-tune GPT-2 on your text, or train one from scratch.

The flags are the original nshepperd ``train.py``'s, with the same names and defaults, plus
modern controls (schedules, precision, max steps, ...). Any flag can also come from a JSON or
YAML file given with ``--config``; the command line wins over the file.

    PYTHONPATH=src ./train.py --dataset my.txt --model_name 124M --max_steps 1000
    gpt2 train --config run.yaml --learning_rate 1e-4

The loop itself lives in :mod:`gpt2.trainer`; this module only turns flags into a TrainConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import optim
from .errors import UserError
from .trainer import PRECISIONS, TrainConfig, train

_D = TrainConfig()


def _bool_text(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpt2 train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune GPT-2 on a dataset, or train one from scratch (--init fresh).")
    a = p.add_argument
    g = p.add_argument_group("original flags (nshepperd/gpt-2 train.py)")
    g.add_argument("--dataset", metavar="PATH", default=_D.dataset,
                   help="Text file, directory, glob, .npz or .bin to train on (required). A "
                   "directory with train/ and valid/ folders is split accordingly.")
    g.add_argument("--model_name", metavar="MODEL", default=_D.model_name,
                   help="Pretrained model folder under --models_dir (117M is an alias of 124M).")
    g.add_argument("--combine", metavar="CHARS", type=int, default=_D.combine,
                   help="Concatenate documents into chunks of at least this many characters.")
    g.add_argument("--encoding", default=_D.encoding,
                   help="Text encoding to read the dataset and write samples.")
    g.add_argument("--batch_size", metavar="SIZE", type=int, default=_D.batch_size,
                   help="Windows of n_ctx tokens per micro-batch.")
    g.add_argument("--learning_rate", metavar="LR", type=float, default=_D.learning_rate,
                   help="Learning rate (the peak rate with a schedule).")
    g.add_argument("--accumulate_gradients", metavar="N", type=int,
                   default=_D.accumulate_gradients,
                   help="Average gradients over N micro-batches per update.")
    g.add_argument("--memory_saving_gradients", action="store_true",
                   help="Activation checkpointing: recompute block activations in backward.")
    g.add_argument("--only_train_transformer_layers", action="store_true",
                   help="Train only the transformer blocks h.*; wte, wpe and ln_f stay frozen.")
    g.add_argument("--optimizer", choices=optim.OPTIMIZERS, default=_D.optimizer,
                   help="Optimizer.")
    g.add_argument("--noise", type=float, default=_D.noise,
                   help="Replace each input token with a random one with this probability "
                   "(targets stay clean).")
    g.add_argument("--top_k", type=int, default=_D.top_k, help="top-k for training samples.")
    g.add_argument("--top_p", type=float, default=_D.top_p,
                   help="top-p for training samples; > 0 replaces top-k.")
    g.add_argument("--restore_from", metavar="WHERE", default=_D.restore_from,
                   help="'latest' (the run's newest checkpoint, else the pretrained model), "
                   "'fresh' (the pretrained model, step 0), or a checkpoint/model directory "
                   "or a file in one.")
    g.add_argument("--run_name", default=_D.run_name,
                   help="Folder under --checkpoint_dir and --samples_dir.")
    g.add_argument("--sample_every", metavar="N", type=int, default=_D.sample_every,
                   help="Write samples every N steps (0: never).")
    g.add_argument("--sample_length", metavar="TOKENS", type=int, default=_D.sample_length,
                   help="Tokens per sample (default n_ctx - 1: 1023 for GPT-2).")
    g.add_argument("--sample_num", metavar="N", type=int, default=_D.sample_num,
                   help="Samples per sampling event.")
    g.add_argument("--save_every", metavar="N", type=int, default=_D.save_every,
                   help="Save a checkpoint every N steps (0: only at the end or on Ctrl-C).")
    g.add_argument("--val_dataset", metavar="PATH", default=_D.val_dataset,
                   help="Dataset for validation loss (default: the dataset's valid/ split, "
                   "--val_fraction of it, or else the training data).")
    g.add_argument("--val_batch_size", type=int, default=_D.val_batch_size,
                   help="Windows per validation batch.")
    g.add_argument("--val_batch_count", type=int, default=_D.val_batch_count,
                   help="Validation batches (fixed windows, drawn once).")
    g.add_argument("--val_every", metavar="N", type=int, default=_D.val_every,
                   help="Compute validation loss every N steps (0: never).")

    m = p.add_argument_group("model location")
    m.add_argument("--models_dir", metavar="DIR", default=_D.models_dir,
                   help="Folder holding pretrained models.")
    m.add_argument("--model_dir", metavar="DIR", default=_D.model_dir,
                   help="Model directory to start from (overrides --models_dir/--model_name).")
    m.add_argument("--init", choices=("pretrained", "fresh"), default=_D.init,
                   help="'fresh': random weights from the model directory's hparams.json "
                   "(train from scratch; it needs only hparams.json and the encoder files).")
    m.add_argument("--dropout", type=float, default=_D.dropout,
                   help="Dropout probability (default: the model's, 0 for released models).")

    t = p.add_argument_group("training controls")
    t.add_argument("--max_steps", metavar="N", type=int, default=_D.max_steps,
                   help="Stop after N updates in total, counted across resumes "
                   "(default: run until Ctrl-C).")
    t.add_argument("--weight_decay", type=float, default=_D.weight_decay,
                   help="Weight decay for matrices and embeddings (decoupled with adamw).")
    t.add_argument("--lr_schedule", choices=optim.SCHEDULES, default=_D.lr_schedule,
                   help="Learning-rate schedule after warm-up; cosine decays to 10%% by "
                   "--max_steps.")
    t.add_argument("--warmup_steps", metavar="N", type=int, default=_D.warmup_steps,
                   help="Linear warm-up from 0 over the first N updates.")
    t.add_argument("--grad_clip", metavar="NORM", type=float, default=_D.grad_clip,
                   help="Clip the gradient norm to this (0: no clipping).")
    t.add_argument("--precision", choices=PRECISIONS, default=_D.precision,
                   help="auto: bf16 on a GPU that supports it, else fp32. fp16 uses a "
                   "gradient scaler.")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=_D.compile,
                   help="torch.compile the model (default: on for CUDA, off for CPU).")
    t.add_argument("--memory_saving_blocks", metavar="WHICH", default=_D.memory_saving_blocks,
                   help="Blocks to checkpoint with --memory_saving_gradients: all, every:N, "
                   "or a list like 0,3,5.")
    t.add_argument("--seed", type=int, default=_D.seed,
                   help="Seed for initialisation, data order, noise and dropout (default: "
                   "random; a resumed run keeps its own).")
    t.add_argument("--device", default=_D.device,
                   help="cpu, cuda, cuda:1, ... (default: this process's GPU if there is one; "
                   "a distributed run picks GPU LOCAL_RANK).")
    t.add_argument("--lora_rank", type=int, default=_D.lora_rank,
                   help="Train rank-R LoRA adapters instead of all weights (0: off). Checkpoints "
                   "hold the merged weights plus adapter/ (lora.json + adapter.safetensors).")
    t.add_argument("--lora_alpha", type=float, default=_D.lora_alpha,
                   help="LoRA scale alpha (the update is alpha/rank * B A; default 2 * rank).")
    t.add_argument("--lora_targets", default=_D.lora_targets,
                   help="Comma-separated layers to adapt: c_attn, c_proj, c_fc, attn.c_proj, "
                   "mlp.c_proj.")
    t.add_argument("--val_fraction", type=float, default=_D.val_fraction,
                   help="With --val_every and no --val_dataset or valid/ split: hold out this "
                   "fraction of the dataset (its last tokens) for validation; 0 validates on "
                   "the training data, as the original did.")
    t.add_argument("--overwrite", action="store_true",
                   help="With --restore_from fresh: replace the run's existing checkpoints.")
    t.add_argument("--loss_chunk", metavar="ROWS", type=int, default=_D.loss_chunk,
                   help="Compute the loss ROWS positions at a time, never holding the whole "
                   "batch's logits (0: off; default: 256 on CPU for vocabularies of 16k+ ids, "
                   "off on GPU).")
    t.add_argument("--skip_memory_check", action="store_true",
                   help="Start even when the memory estimate exceeds the free memory.")

    d = p.add_argument_group("distributed (torchrun / mpirun / srun; see README)")
    d.add_argument("--fsdp", action="store_true",
                   help="Shard parameters, gradients and optimizer state across the processes "
                   "(FSDP2) instead of replicating them (DDP): for models whose Adam state does "
                   "not fit on one device. Checkpoints are still saved whole.")
    d.add_argument("--dist_timeout", metavar="MINUTES", type=float, default=_D.dist_timeout,
                   help="Give up when another process has not answered for this long (a rank "
                   "died or hangs) instead of waiting forever.")

    o = p.add_argument_group("outputs")
    o.add_argument("--print_every", metavar="N", type=int, default=_D.print_every,
                   help="Print the loss line every N steps.")
    o.add_argument("--keep_checkpoints", metavar="K", type=int, default=_D.keep_checkpoints,
                   help="Keep the newest K model-N checkpoint directories.")
    o.add_argument("--checkpoint_dir", metavar="DIR", default=_D.checkpoint_dir,
                   help="Checkpoints go to DIR/<run_name>/.")
    o.add_argument("--samples_dir", metavar="DIR", default=_D.samples_dir,
                   help="Samples go to DIR/<run_name>/samples-<step>.")
    o.add_argument("--tensorboard", action="store_true",
                   help="Also log loss, validation loss, learning rate, throughput and samples "
                   "for TensorBoard, in <checkpoint_dir>/<run_name>/tensorboard (needs: "
                   "pip install 'gpt2[tensorboard]').")
    o.add_argument("--tensorboard_dir", metavar="DIR", default=_D.tensorboard_dir,
                   help="TensorBoard log folder (implies --tensorboard).")
    a("--config", metavar="FILE", help="JSON or YAML file of flag values (command line wins).")
    return p


def read_config_file(path: str) -> dict:
    """Flag values from a JSON or YAML mapping (keys are flag names, with or without --)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read ({e})") from None
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # json and yaml each raise their own error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--config {path}: not valid JSON/YAML ({first})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}


def _apply_config(parser: argparse.ArgumentParser, values: dict, path: str) -> None:
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            raise UserError(f"--config {path}: unknown setting {key!r}")
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                value = value if isinstance(value, bool) or value is None else _bool_text(value)
            elif value is not None and action.type is not None:
                if isinstance(value, bool):
                    raise ValueError(f"expected a number, got {value!r}")
                value = action.type(value)
            elif value is not None:
                value = str(value)
        except (TypeError, ValueError) as e:
            raise UserError(f"--config {path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"--config {path}: {key} must be one of "
                            f"{', '.join(map(str, action.choices))}, got {value!r}")
        defaults[key] = value
    parser.set_defaults(**defaults)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        _apply_config(parser, read_config_file(pre.config), pre.config)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in args.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    return train(parse_config(argv))


if __name__ == "__main__":
    from .cli import script

    script("train")

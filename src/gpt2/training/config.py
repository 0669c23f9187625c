"""Every training setting, declared once: name, type, default, help and check in one place.

    cfg = parse_config(["--dataset", "my.txt", "--max_steps", "1000"])   # command line (+ --config)
    cfg = TrainConfig(dataset="my.txt", max_steps=1000); cfg.validate()  # or from Python

:class:`TrainConfig`'s fields are the flags. The argparse parser (:func:`build_parser`), the
JSON/YAML ``--config`` file reader and :meth:`TrainConfig.validate` are all derived from those
declarations, so a flag cannot exist in one and be missing from another. The flags are the
original nshepperd ``train.py``'s, with the same names and defaults, plus modern controls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from ..flags import ArgumentParser, at_least, flag, in_range, nonneg_number
from ..data.examples import FORMATS
from ..errors import UserError
from ..runtime import AUTO, PRECISIONS
from ..tasks import TASKS
from . import optim

ORIGINAL = "original flags (nshepperd/gpt-2 train.py)"
LOCATION = "model location"
CONTROLS = "training controls"
EXAMPLES = "instruction and chat examples (see README)"
PREFERENCES = "preference tuning (see README)"
EVALS = "benchmarks during training (see README)"
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("copy", "adapters", "precomputed")
DISTRIBUTED = "distributed (torchrun / mpirun / srun; see README)"
OUTPUTS = "outputs"


def _plain_name(v: str):
    bad = not v or os.sep in v or v in (".", "..")
    return f"must be a plain folder name, got {v!r}" if bad else None


@dataclass
class TrainConfig:
    """Every setting of a run; the command line maps onto it one to one."""

    # -- the original flags
    dataset: str = flag(
        "", "Text file, directory, glob, .npz or .bin to train on (required). A directory "
        "with train/ and valid/ folders is split accordingly.", group=ORIGINAL, metavar="PATH")
    model_name: str = flag(
        "124M", "Pretrained model folder under --models_dir (117M is an alias of 124M).",
        group=ORIGINAL, metavar="MODEL")
    combine: int = flag(50000, "Concatenate documents into chunks of at least this many "
                        "characters.", group=ORIGINAL, check=at_least(0), metavar="CHARS")
    encoding: str = flag("utf-8", "Text encoding to read the dataset and write samples.",
                         group=ORIGINAL)
    batch_size: int = flag(1, "Windows of n_ctx tokens per micro-batch.", group=ORIGINAL,
                           check=at_least(1), metavar="SIZE")
    learning_rate: float = flag(2e-5, "Learning rate (the peak rate with a schedule).",
                                group=ORIGINAL, check=nonneg_number, metavar="LR")
    accumulate_gradients: int = flag(1, "Average gradients over N micro-batches per update.",
                                     group=ORIGINAL, check=at_least(1), metavar="N")
    memory_saving_gradients: bool = flag(
        False, "Activation checkpointing: recompute block activations in backward.",
        group=ORIGINAL)
    only_train_transformer_layers: bool = flag(
        False, "Train only the transformer blocks h.*; wte, wpe and ln_f stay frozen.",
        group=ORIGINAL)
    optimizer: str = flag("adam", "Optimizer.", group=ORIGINAL, choices=optim.OPTIMIZERS)
    noise: float = flag(0.0, "Replace each input token with a random one with this "
                        "probability (targets stay clean).", group=ORIGINAL,
                        check=in_range(0.0, 1.0))
    top_k: int = flag(40, "top-k for training samples.", group=ORIGINAL, check=at_least(0))
    top_p: float = flag(0.0, "top-p for training samples; > 0 replaces top-k.",
                        group=ORIGINAL, check=in_range(0.0, 1.0, closed=True))
    restore_from: str = flag(
        "latest", "'latest' (the run's newest checkpoint, else the pretrained model), 'fresh' "
        "(the pretrained model, step 0), or a checkpoint/model directory or a file in one.",
        group=ORIGINAL, metavar="WHERE")
    run_name: str = flag("run1", "Folder under --checkpoint_dir and --samples_dir.",
                         group=ORIGINAL, check=_plain_name)
    sample_every: int = flag(100, "Write samples every N steps (0: never).", group=ORIGINAL,
                             check=at_least(0), metavar="N")
    sample_length: int | None = flag(
        None, "Tokens per sample (default n_ctx - 1: 1023 for GPT-2).", group=ORIGINAL,
        check=at_least(1), metavar="TOKENS", shown="n_ctx − 1")
    sample_num: int = flag(1, "Samples per sampling event.", group=ORIGINAL, check=at_least(1),
                           metavar="N")
    save_every: int = flag(1000, "Save a checkpoint every N steps (0: only at the end or on "
                           "Ctrl-C).", group=ORIGINAL, check=at_least(0), metavar="N")
    val_dataset: str | None = flag(
        None, "Dataset for validation loss (default: the dataset's valid/ split, "
        "--val_fraction of it, or else the training data).", group=ORIGINAL, metavar="PATH",
        shown="none")
    val_batch_size: int = flag(2, "Windows per validation batch.", group=ORIGINAL,
                               check=at_least(1))
    val_batch_count: int = flag(40, "Validation batches (fixed windows, drawn once).",
                                group=ORIGINAL, check=at_least(1))
    val_every: int = flag(0, "Compute validation loss every N steps and at --max_steps (0: "
                          "never).",
                          group=ORIGINAL, check=at_least(0), metavar="N")
    # -- where the model comes from
    models_dir: str = flag("models", "Folder holding pretrained models.", group=LOCATION,
                           metavar="DIR")
    model_dir: str | None = flag(
        None, "Model directory to start from (overrides --models_dir/--model_name).",
        group=LOCATION, metavar="DIR", shown="none")
    init: str = flag(
        "pretrained", "'fresh': random weights from the model directory's hparams.json (train "
        "from scratch; it needs only hparams.json and the encoder files).", group=LOCATION,
        choices=("pretrained", "fresh"))
    dropout: float | None = flag(
        None, "Dropout probability (default: the model's, 0 for released models).",
        group=LOCATION, check=in_range(0.0, 1.0), shown="the model's")
    # -- training controls
    text_field: str = flag("text", "The field holding the text in .jsonl records and the column "
                           "in .parquet files.", metavar="NAME")
    literal_endoftext: bool = flag(
        False, "Keep <|endoftext|> in text as ordinary text (7 tokens), as the original did, "
        "instead of separating documents there.")
    max_steps: int | None = flag(
        None, "Stop after N updates in total, counted across resumes (default: run until "
        "Ctrl-C).", check=at_least(0), metavar="N", shown="none")
    weight_decay: float = flag(0.0, "Weight decay for matrices and embeddings (decoupled with "
                               "adamw).", check=nonneg_number)
    muon_lr: float = flag(optim.MUON_LR, "--optimizer muon: the rate of the blocks' matrices "
                          "(Muon); --learning_rate is the AdamW rate of the rest (embeddings, "
                          "biases, norms). modded-nanogpt's: 0.05.", check=nonneg_number,
                          metavar="LR")
    lr_schedule: str = flag("constant", "Learning-rate schedule after warm-up; cosine decays "
                            "to --min_lr_fraction of the rate by --max_steps.",
                            choices=optim.SCHEDULES)
    min_lr_fraction: float = flag(optim.COSINE_FLOOR, "The cosine schedule's last rate, as a "
                                  "fraction of --learning_rate (llm.c's GPT-2 recipe: 0).",
                                  check=in_range(0.0, 1.0, closed=True), metavar="F")
    adam_beta2: float = flag(0.999, "Adam/AdamW's second-moment decay (TF's default 0.999; "
                             "GPT-3 and llm.c: 0.95).", check=in_range(0.0, 1.0), metavar="B2")
    warmup_steps: int = flag(0, "Linear warm-up from 0 over the first N updates.",
                             check=at_least(0), metavar="N")
    grad_clip: float = flag(0.0, "Clip the gradient norm to this (0: no clipping).",
                            check=nonneg_number, metavar="NORM")
    precision: str = flag(AUTO, "auto: bf16 on a GPU that supports it, else fp32. fp16 uses a "
                          "gradient scaler.", choices=(AUTO,) + PRECISIONS)
    compile: bool | None = flag(None, "torch.compile the model with the device's backend "
                                "(default: on for CUDA, XPU and TPU; off for the CPU and MPS).",
                                shown="on for GPUs, TPUs")
    packed_attention: str = flag(
        "auto", "How packed rows (several sequences in a row) attend: dense (a [T, T] mask per "
        "row), flex (FlexAttention's document mask: no dense mask, blocks no query sees are "
        "skipped; GPUs) or auto (flex on CUDA, dense elsewhere).",
        choices=("auto", "dense", "flex"))
    memory_saving_blocks: str = flag(
        "all", "Blocks to checkpoint with --memory_saving_gradients: all, every:N, or a list "
        "like 0,3,5.", metavar="WHICH")
    seed: int | None = flag(None, "Seed for initialisation, data order, noise and dropout "
                            "(default: random; a resumed run keeps its own).", shown="random")
    device: str | None = flag(None, "cpu, cuda, cuda:1, xpu, mps, tpu (default: this "
                              "process's accelerator if there is one; a distributed run picks "
                              "device LOCAL_RANK).", shown="accelerator if any")
    lora_rank: int = flag(0, "Train rank-R LoRA adapters instead of all weights (0: off). "
                          "Checkpoints hold the merged weights plus adapter/ (lora.json + "
                          "adapter.safetensors).", check=at_least(0))
    lora_alpha: float | None = flag(None, "LoRA scale alpha (the update is alpha/rank * B A; "
                                    "default 2 * rank).", shown="2 x rank")
    lora_targets: str = flag("c_attn", "Comma-separated layers to adapt: c_attn, c_proj, c_fc, "
                             "attn.c_proj, mlp.c_proj.")
    val_fraction: float = flag(
        0.05, "With --val_every and no --val_dataset or valid/ split: hold out this fraction "
        "of the dataset (its last tokens) for validation; 0 validates on the training data, "
        "as the original did.", check=in_range(0.0, 1.0))
    overwrite: bool = flag(False, "With --restore_from fresh: replace the run's existing "
                           "checkpoints.")
    loss_chunk: int = flag(
        0, "Compute the loss ROWS positions at a time, never holding more than ROWS x vocab "
        "logits (saves memory, costs a little time; 0: the whole batch at once).",
        check=at_least(0), metavar="ROWS")
    skip_memory_check: bool = flag(False, "Start even when the memory estimate exceeds the "
                                   "free memory.")
    # -- examples
    data_format: str = flag(
        "auto", "What the dataset's records are: auto (from the first record's fields), text, "
        "prompt_completion, messages, alpaca or sharegpt.", group=EXAMPLES,
        choices=("auto", "text") + FORMATS)
    train_on_prompt: bool = flag(
        False, "Learn the prompts and user turns too (default: only completions, assistant "
        "turns and the <|endoftext|> ending each).", group=EXAMPLES)
    packing: bool | None = flag(
        None, "Pack several examples into each n_ctx row (each attends only to itself, "
        "positions from 0); off: one example per row, padded per batch.", group=EXAMPLES,
        shown="on")
    drop_long: bool = flag(False, "Drop examples longer than n_ctx (default: keep their end, "
                           "the answer, and cut the start of the prompt).", group=EXAMPLES)
    epochs: int | None = flag(
        None, "Passes over the examples (sets --max_steps; give one of the two).",
        group=EXAMPLES, check=at_least(1), metavar="N", shown="none")
    chat_template: str | None = flag(
        None, "A Jinja chat template file (default: the model directory's "
        "chat_template.jinja, else gpt2's own). Saved into every checkpoint.",
        group=EXAMPLES, metavar="FILE", shown="the model's")
    # -- preference tuning
    objective: str = flag(
        "sft", "What to learn: sft (the targets' cross-entropy: text, examples, chats); from "
        "preference pairs (records with chosen and rejected): dpo, orpo or simpo; from rewards "
        "on sampled completions of prompts (records with prompt): grpo.",
        group=PREFERENCES, choices=OBJECTIVES)
    dpo_loss: str = flag("sigmoid", "DPO's loss: sigmoid (DPO), ipo or hinge (as TRL's).",
                         group=PREFERENCES, choices=DPO_LOSSES)
    beta: float = flag(0.1, "DPO's and SimPO's beta (how sharply pairs are told apart; DPO: "
                       "how far from the reference), ORPO's lambda (the odds-ratio term's "
                       "weight).", group=PREFERENCES,
                       check=lambda v: None if v > 0 else f"must be > 0, got {v!r}")
    label_smoothing: float = flag(
        0.0, "DPO (sigmoid) and SimPO: the chance that a pair's labels are wrong (conservative "
        "DPO).", group=PREFERENCES, check=in_range(0, 0.5))
    simpo_gamma: float = flag(0.5, "SimPO's target margin gamma.", group=PREFERENCES,
                              check=nonneg_number)
    reference: str | None = flag(
        None, "DPO's reference model: copy (a frozen copy of the starting model), adapters "
        "(this model with its LoRA adapters off: no second copy; needs --lora_rank) or "
        "precomputed (its log-probabilities computed once before training and kept in every "
        "checkpoint: no second model in memory).", group=PREFERENCES, choices=REFERENCES,
        shown="copy; adapters with --lora_rank")
    reward: str = flag("exact_match", "GRPO's rewards, comma-separated: exact_match, regex, "
                       "module:function (see README).", group=PREFERENCES, metavar="REWARDS")
    reward_weights: str | None = flag(None, "Their weights, comma-separated.", group=PREFERENCES,
                                      metavar="W", shown="all 1")
    answer_field: str = flag("answer", "What exact_match compares with.", group=PREFERENCES)
    reward_regex: str = flag("", "What regex matches whole.", group=PREFERENCES)
    num_generations: int = flag(8, "GRPO: completions per prompt.", group=PREFERENCES,
                                check=at_least(2), metavar="G")
    max_completion_length: int = flag(64, "GRPO: tokens per completion, at most.",
                                      group=PREFERENCES, check=at_least(1), metavar="N")
    generation_temperature: float = flag(1.0, "GRPO: the sampling temperature.",
                                         group=PREFERENCES, check=in_range(1e-6, 1e6))
    epsilon: float = flag(0.2, "GRPO: the ratio's clipping range.", group=PREFERENCES,
                          check=in_range(0, 1))
    kl_coef: float = flag(0.0, "GRPO: weight of the KL to a frozen copy of the starting model.",
                          group=PREFERENCES, check=nonneg_number)
    # -- benchmarks during training
    eval_every: int = flag(
        0, "Score --eval_tasks every N steps (and at step 0 and --max_steps), into "
        "metrics.jsonl and TensorBoard (0: never).", group=EVALS, check=at_least(0), metavar="N")
    eval_tasks: str = flag(
        "hellaswag", "Comma-separated: " + ", ".join(
            f"{t.name} ({', '.join(t.shown)})" for t in TASKS.values() if t.in_training) +
        ", scored as gpt2 evaluate --task; TASK=PATH reads PATH instead of the file `gpt2 "
        "download --dataset TASK` put in --eval_data_dir.", group=EVALS, metavar="TASKS")
    eval_limit: int | None = flag(None, "Score the first K examples of each task.",
                                  group=EVALS, check=at_least(1), metavar="K", shown="all")
    eval_data_dir: str = flag("data", "Where `gpt2 download --dataset` put the task files.",
                              group=EVALS, metavar="DIR")
    # -- distributed
    fsdp: bool = flag(
        False, "Shard parameters, gradients and optimizer state across the processes (FSDP2) "
        "instead of replicating them (DDP): for models whose Adam state does not fit on one "
        "device. Checkpoints are still saved whole.", group=DISTRIBUTED)
    dist_timeout: float = flag(
        10.0, "Give up when another process has not answered for this long (a rank died or "
        "hangs) instead of waiting forever.", group=DISTRIBUTED,
        check=lambda v: None if v > 0 else f"must be > 0 (minutes), got {v!r}",
        metavar="MINUTES")
    # -- outputs
    print_every: int = flag(1, "Print the loss line every N steps (the losses are read from "
                            "the device then, not after every step).", group=OUTPUTS,
                            check=at_least(1), metavar="N")
    keep_checkpoints: int = flag(5, "Keep the newest K model-N checkpoint directories.",
                                 group=OUTPUTS, check=at_least(1), metavar="K")
    checkpoint_dir: str = flag("checkpoint", "Checkpoints go to DIR/<run_name>/.",
                               group=OUTPUTS, metavar="DIR")
    samples_dir: str = flag("samples", "Samples go to DIR/<run_name>/samples-<step>.",
                            group=OUTPUTS, metavar="DIR")
    tensorboard: bool = flag(
        False, "Also log loss, validation loss, learning rate, throughput and samples for "
        "TensorBoard, in <checkpoint_dir>/<run_name>/tensorboard (needs: pip install "
        "'gpt2[tensorboard]').", group=OUTPUTS)
    tensorboard_dir: str | None = flag(None, "TensorBoard log folder (implies --tensorboard).",
                                       group=OUTPUTS, metavar="DIR",
                                       shown="checkpoint/<run>/tensorboard")

    def eval_files(self) -> dict[str, Path]:
        """--eval_tasks as {task: data file}, each checked to exist."""
        return eval_files(self.eval_tasks, self.eval_data_dir)

    @property
    def wants_tensorboard(self) -> bool:
        return self.tensorboard or self.tensorboard_dir is not None

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint_dir) / self.run_name

    def validate(self) -> None:
        """Refuse impossible settings before anything is loaded (one line, naming the flag)."""
        if not self.dataset:
            raise UserError("--dataset is required (on the command line or in --config)")
        types = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, types[f.name])
            if problem is None and value is not None and f.metadata["check"]:
                problem = f.metadata["check"](value)
            choices = f.metadata["choices"]
            if problem is None and choices and value is not None and value not in choices:
                problem = f"must be one of {', '.join(choices)}, got {value!r}"
            if problem:
                raise UserError(f"--{f.name} {problem}")
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        if self.reference == "adapters" and not self.lora_rank:
            raise UserError("--reference adapters needs --lora_rank (the reference is the model "
                            "without its adapters)")
        if self.lora_rank:
            for name, on in (("fsdp", self.fsdp), ("init fresh", self.init == "fresh"),
                             ("only_train_transformer_layers",
                              self.only_train_transformer_layers)):
                if on:
                    raise UserError(f"--lora_rank cannot be combined with --{name}")
        if self.wants_tensorboard:
            from .tensorboard import require

            require()
        import torch

        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise UserError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is "
                            f"torch {torch.__version__}")
        if self.optimizer == "muon" and self.fsdp:
            raise UserError("--optimizer muon cannot be combined with --fsdp: Muon "
                            "orthogonalizes whole matrices and FSDP shards them (use DDP)")
        if self.eval_every:
            self.eval_files()
        if self.epochs is not None and self.max_steps is not None:
            raise UserError("--epochs sets --max_steps: give one of the two")
        if self.lr_schedule == "cosine" and not (self.max_steps or self.epochs):
            raise UserError("--lr_schedule cosine needs --max_steps or --epochs (the length of "
                            "the decay)")


def eval_files(eval_tasks: str, eval_data_dir: str) -> dict[str, Path]:
    """--eval_tasks as {task: data file}, each checked to exist."""
    from ..tasks import task_file, training_tasks

    files: dict[str, Path] = {}
    for item in filter(None, (t.strip() for t in eval_tasks.split(","))):
        task, _, path = item.partition("=")
        if task not in training_tasks():
            raise UserError(f"--eval_tasks: {task!r} is not one of "
                            f"{', '.join(training_tasks())} (WikiText: gpt2 evaluate --task "
                            "wikitext2 on a checkpoint)")
        files[task] = task_file(task, path or None, eval_data_dir, "--eval_tasks:",
                                f"{task}=PATH")
        if not files[task].is_file():
            raise UserError(f"--eval_tasks: {task}: no {files[task]}")
    if not files:
        raise UserError("--eval_tasks: name at least one task (or leave --eval_every 0)")
    return files


# --- one declaration -> parser, config file, validation -----------------------------------------

def _base_type(hint) -> tuple[type, bool]:
    """(int/float/str/bool, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _type_problem(value, hint) -> str | None:
    base, optional = _base_type(hint)
    if value is None:
        return None if optional else "needs a value, got none"
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, bool) != (base is bool) or not isinstance(value, base):
        return f"expected {_KINDS[base]}, got {value!r}"
    return None


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(value, hint):
    """A config-file value to the field's type: what argparse does for command-line text."""
    base, optional = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise ValueError("needs a value, got null")
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, bool) or (base in (int, float) and isinstance(value, (list, dict))):
        raise ValueError(f"expected a number, got {value!r}")
    return base(value)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2 train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune GPT-2 on a dataset, or train one from scratch (--init fresh).")
    types = typing.get_type_hints(TrainConfig)
    groups: dict[str, object] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        g = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], p.add_argument_group(meta["group"]))
        base, optional = _base_type(types[f.name])
        kwargs = {"default": f.default, "help": meta["help"]}
        if base is bool and optional:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=base, choices=meta["choices"], metavar=meta["metavar"])
        g.add_argument(f"--{f.name}", **kwargs)
    p.add_argument("--config", metavar="FILE",
                   help="JSON or YAML file of flag values (command line wins).")
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


def config_defaults(values: dict, path: str) -> dict:
    """A config file's values, converted to each field's type and checked like flags."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    types = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"--config {path}: unknown setting {key!r}")
        try:
            value = _convert(value, types[key])
        except (TypeError, ValueError) as e:
            raise UserError(f"--config {path}: {key}: {e}") from None
        choices = fields[key].metadata["choices"]
        if choices is not None and value not in choices:
            raise UserError(f"--config {path}: {key} must be one of "
                            f"{', '.join(map(str, choices))}, got {value!r}")
        out[key] = value
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line (and its --config file; the command line wins) as a TrainConfig."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**config_defaults(read_config_file(pre.config), pre.config))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args)

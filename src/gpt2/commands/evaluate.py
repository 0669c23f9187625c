"""``gpt2 evaluate MODEL_DIR --dataset PATH``: loss and perplexity, or two models side by side.

    gpt2 evaluate checkpoint/run1 --dataset data/test.txt
    gpt2 evaluate checkpoint/run1 --dataset data/corpus --stride 512   # uses corpus/test/
    gpt2 evaluate checkpoint/run1 --dataset data/test.txt --compare models/124M
    gpt2 evaluate checkpoint/run1 --task hellaswag --data hellaswag_val.jsonl --out hs.json
    gpt2 evaluate checkpoint/run1 --task lambada --data lambada_test.jsonl
    gpt2 download --dataset wikitext2 && gpt2 evaluate models/124M --task wikitext2

Which tokens are scored, and how: :mod:`gpt2.perplexity`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..flags import ArgumentParser, HelpFormatter
from ..data.dataset import load_dataset
from ..data.splits import find_corpus_splits
from ..errors import UserError
from ..perplexity import evaluate, exp_or_inf
from ..files.paths import find_model_dir
from ..io.inference import load_for_inference
from ..io.model_dir import check_model_dir
from ..runtime import PRECISIONS, pick_device
from ..sampling import sample_sequence
from ..tasks import TASKS
from ..tokenizer.files import encoder_fingerprint, load_encoder
from .common import add_dtype_argument


def _dataset_path(text: str) -> str | Path:
    """The file/dir/glob to evaluate: a corpus directory means its test/ (else valid/) split."""
    splits = find_corpus_splits(text)
    if splits is None:
        return text  # a glob stays a glob
    for name in ("test", "valid"):
        if splits.get(name) is not None:
            print(f"evaluating the {name} split of corpus {text}: {splits[name]}", file=sys.stderr)
            return Path(splits[name])
    raise UserError(f"--dataset {text}: corpus directory has no test/ or valid/ split "
                    "(evaluating on training data would say nothing)")


def _samples(model, enc, prompts: list[str], length: int, seed: int) -> list[str]:
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = enc.encode(prompt) if prompt else [enc.eot_token]
        if None in ids:
            raise UserError("an empty --prompt needs a tokenizer with <|endoftext|>")
        ids = ids[-(model.config.n_ctx + 1 - length):]
        context = torch.tensor([ids], device=device)
        tokens = sample_sequence(model, length, context, top_k=40, seed=seed)
        out.append(enc.decode(tokens[0, len(ids):].tolist()))
    return out


def _row(label: str, values: list[str], width: int) -> str:
    return f"{label:<12}" + "".join(f"  {v:>{width}}" for v in values)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="gpt2 evaluate", formatter_class=HelpFormatter,
        description="Mean loss and perplexity of a model over a whole dataset.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("--dataset", default=None,
                   help="text file, directory, glob, .npz or .bin; a corpus directory with a "
                        "test/ folder means that split (required unless --task)")
    p.add_argument("--task", choices=list(TASKS), default=None,
                   help="a benchmark scored as its reference does (gpt2.tasks): " +
                        "; ".join(t.about for t in TASKS.values()))
    p.add_argument("--data", default=None, metavar="PATH",
                   help="--task: the task's data file (hellaswag: rowanz's hellaswag_val.jsonl; "
                        "lambada: OpenAI's lambada_test.jsonl; wikitext2/103: the raw zip or its "
                        "wiki.test.raw); default: where `gpt2 download --dataset TASK` puts it "
                        "under --data_dir")
    p.add_argument("--data_dir", default="data",
                   help="--task without --data: the folder `gpt2 download --dataset` filled")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="--task: score the first N examples only")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="--task: also write the results as JSON (task, data sha256, model, "
                        "dtype, counts)")
    p.add_argument("--combine", type=int, default=50000,
                   help="minimum characters per chunk when encoding text (as in training)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the dataset files")
    p.add_argument("--text_field", default="text", metavar="NAME",
                   help="the field of .jsonl records / column of .parquet files with the text")
    p.add_argument("--literal_endoftext", action="store_true",
                   help="keep <|endoftext|> in text as ordinary text, as the original did")
    p.add_argument("--n_ctx", type=int, default=None,
                   help="window length in tokens (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step; each window scores only tokens the previous one "
                        "did not (default: n_ctx, non-overlapping windows; --task wikitext*: "
                        "n_ctx/2)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="autocast precision of the forward pass")
    add_dtype_argument(p)
    p.add_argument("--compare", metavar="OTHER_DIR", default=None,
                   help="also evaluate this model (e.g. the base you fine-tuned from) and print "
                        "both side by side, with samples for fixed prompts")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt for the --compare samples (repeatable; default: unconditional "
                        "and the first tokens of the dataset)")
    p.add_argument("--sample_length", type=int, default=60, help="tokens per --compare sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the --compare samples")
    return p


def _print_comparison(dirs, results, samples, prompts, seed: int) -> None:
    names = [str(d) for d in dirs]
    width = max(12, *map(len, names))
    print(_row("", names, width))
    print(_row("loss", [f"{r['loss']:.4f}" for r in results], width))
    print(_row("perplexity", [f"{r['perplexity']:.4f}" for r in results], width))
    print(_row("tokens", [str(r["tokens"]) for r in results], width))
    delta = results[1]["loss"] - results[0]["loss"]
    print(f"{names[1]} vs {names[0]}: loss {delta:+.4f}, perplexity "
          f"x{exp_or_inf(delta):.3f} (top_k 40 samples below, seed {seed})")
    for i, prompt in enumerate(prompts):
        shown = prompt if prompt else "<|endoftext|> (unconditional)"
        print(f"\n{'=' * 20} prompt {i + 1}: {shown!r} {'=' * 20}")
        for name, texts in zip(names, samples):
            print(f"{'-' * 10} {name} {'-' * 10}\n{texts[i]}")


def _task(args) -> int:
    """--task: a benchmark's scores, printed as a table and written to --out."""
    from ..files.atomic import write_json
    from ..tasks import sha256_of, task_file

    task = TASKS[args.task]
    for flag, value in (("dataset", args.dataset), ("compare", args.compare),
                        ("n_ctx", args.n_ctx),
                        ("stride", None if "stride" in task.options else args.stride)):
        if value is not None:
            raise UserError(f"--{flag} does not apply to --task (it scores the task's rows "
                            "as the reference does)")
    if args.precision != "fp32":
        raise UserError("--precision does not apply to --task; --dtype sets the weights' type")
    data = task_file(args.task, args.data, args.data_dir)
    device = pick_device(args.device)
    model_dir = find_model_dir(args.model_dir)
    check_model_dir(model_dir)
    rows = task.read(data, args.limit)  # checked before the model is loaded
    model, enc, _, _ = load_for_inference(model_dir, device, args.dtype)
    options = {"stride": args.stride or max(model.config.n_ctx // 2, 1)} \
        if "stride" in task.options else {}
    result = task.score(model, enc, rows, batch_size=args.batch_size, **options)
    result.update(**options, data=str(data), data_sha256=sha256_of(data),
                  model=str(model_dir), dtype=args.dtype, limit=args.limit)
    print("| task | examples | " + " | ".join(task.shown) + " |\n|---|---|" +
          "---|" * len(task.shown))
    print(f"| {args.task} | {result['examples']} | " +
          " | ".join(f"{result[k]:.4f}" for k in task.shown) + " |")
    if args.out:
        write_json(args.out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("n_ctx", "stride", "batch_size", "sample_length", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if args.task:
        return _task(args)
    if args.dataset is None:
        raise UserError("--dataset is required (or --task with --data)")
    device = pick_device(args.device)
    dirs = [find_model_dir(args.model_dir)]
    if args.compare:
        dirs.insert(0, find_model_dir(args.compare))  # the base goes in the left column
        if encoder_fingerprint(dirs[0]) != encoder_fingerprint(dirs[1]):
            raise UserError(f"--compare {args.compare}: its tokenizer differs from "
                            f"{args.model_dir}'s, so their losses are not comparable")
    configs = [check_model_dir(d) for d in dirs]  # before reading any data
    enc = load_encoder(dirs[-1])
    if enc.n_vocab > min(c.n_vocab for c in configs):
        raise UserError(f"{dirs[-1]}: the tokenizer has {enc.n_vocab} ids but the model only "
                        f"{min(c.n_vocab for c in configs)}; they do not belong together")
    # Both models see the same windows, or their numbers could not be compared.
    max_ctx = min(c.n_ctx for c in configs)
    n_ctx = args.n_ctx or max_ctx
    if n_ctx > max_ctx:
        raise UserError(f"--n_ctx {n_ctx} is larger than the model's context of {max_ctx} tokens")
    if args.stride is not None and args.stride > n_ctx:
        raise UserError(f"--stride {args.stride} is larger than the window ({n_ctx} tokens)")

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the results
        chunks = load_dataset(_dataset_path(args.dataset), enc, combine=args.combine,
                              encoding=args.encoding, text_field=args.text_field,
                              split_eot=not args.literal_endoftext)
    print(f"scoring {sum(map(len, chunks))} tokens in {len(chunks)} chunks: windows of {n_ctx} "
          f"tokens, stride {args.stride or n_ctx}", file=sys.stderr)
    prompts = args.prompt
    if prompts is None:
        first = next((c for c in chunks if len(c)), [])
        prompts = ([""] if enc.eot_token is not None else []) + \
            [enc.decode([int(t) for t in first[:16]])]

    results, samples = [], []
    for d in dirs:
        model = load_for_inference(d, device, args.dtype).model
        try:
            results.append(evaluate(model, chunks, n_ctx=n_ctx, stride=args.stride,
                                    batch_size=args.batch_size, precision=args.precision))
        except ValueError as e:
            raise UserError(f"--dataset {args.dataset}: {e}") from None
        if args.compare:
            length = min(args.sample_length, model.config.n_ctx)
            samples.append(_samples(model, enc, prompts, length, args.seed))
        del model
    if args.compare:
        _print_comparison(dirs, results, samples, prompts, args.seed)
        return 0
    r = results[0]
    print(f"loss = {r['loss']:.4f}")
    print(f"perplexity = {r['perplexity']:.4f}")
    print(f"tokens = {r['tokens']}")
    return 0

"""``gpt2 tokenizer train``: a GPT-2-style byte-level BPE vocabulary for your own corpus.

    python -m gpt2 tokenizer train corpus/ --vocab_size 8192 --out models/my-tok
    python -m gpt2 tokenizer train corpus/ --type sentencepiece --vocab_size 8000 --out models/sp
    python -m gpt2 train --dataset corpus/ --model_dir models/my-tok --init fresh

The training itself is :mod:`gpt2.tokenizer.train`.
"""

from __future__ import annotations

import argparse

from ..flags import ArgumentParser
from ..tokenizer.train import train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="gpt2 tokenizer", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE or a sentencepiece model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("corpus", nargs="+", help="files, directories or globs of any kind encode.py "
                                             "reads (text, .jsonl, .csv, .parquet, compressed)")
    t.add_argument("--type", choices=("bpe", "sentencepiece"), default="bpe",
                   help="bpe: GPT-2's byte-level BPE (encoder.json + vocab.bpe); sentencepiece: "
                        "sp.model")
    t.add_argument("--vocab_size", type=int, required=True,
                   help="number of ids, <|endoftext|> included")
    t.add_argument("--out", required=True, help="directory to write the tokenizer into")
    t.add_argument("--encoding", default="utf-8", help="text encoding of the corpus")
    t.add_argument("--text_field", default="text", metavar="NAME",
                   help="the field of .jsonl records / column of .parquet files with the text")
    s = t.add_argument_group("sentencepiece (with --type sentencepiece)")
    s.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram",
                   help="sentencepiece's algorithm")
    s.add_argument("--byte_fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="spell characters outside the vocabulary as bytes (no unknown token)")
    s.add_argument("--input_sentence_size", type=int, default=1_000_000, metavar="LINES",
                   help="lines sampled from the corpus to train on (the rest is only read)")
    s.add_argument("--character_coverage", type=float, default=0.9995,
                   help="fraction of the corpus's characters the vocabulary must cover")
    t.add_argument("--n_ctx", type=int, default=1024, help="hparams.json: context length")
    t.add_argument("--n_embd", type=int, default=768, help="hparams.json: width")
    t.add_argument("--n_head", type=int, default=12, help="hparams.json: attention heads")
    t.add_argument("--n_layer", type=int, default=12, help="hparams.json: layers")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sp = {} if args.type == "bpe" else dict(
        model_type=args.model_type, byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size,
        character_coverage=args.character_coverage)
    train_tokenizer(args.corpus, args.vocab_size, args.out, encoding=args.encoding,
                    n_ctx=args.n_ctx, n_embd=args.n_embd, n_head=args.n_head,
                    n_layer=args.n_layer, quiet=args.quiet, kind=args.type,
                    text_field=args.text_field, **sp)
    return 0

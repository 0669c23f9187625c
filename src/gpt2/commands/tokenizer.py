"""``gpt2 tokenizer train``: a GPT-2-style byte-level BPE vocabulary for your own corpus.

    python -m gpt2 tokenizer train corpus/ --vocab_size 8192 --out models/my-tok
    python -m gpt2 train --dataset corpus/ --model_dir models/my-tok --init fresh

The training itself is :mod:`gpt2.tokenizer.train`.
"""

from __future__ import annotations

import argparse

from ..cli import ArgumentParser
from ..tokenizer.train import train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="gpt2 tokenizer", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("corpus", nargs="+", help="text files, directories or globs")
    t.add_argument("--vocab_size", type=int, required=True,
                   help="number of ids, <|endoftext|> included")
    t.add_argument("--out", required=True, help="directory to write the tokenizer into")
    t.add_argument("--encoding", default="utf-8", help="text encoding of the corpus")
    t.add_argument("--n_ctx", type=int, default=1024, help="hparams.json: context length")
    t.add_argument("--n_embd", type=int, default=768, help="hparams.json: width")
    t.add_argument("--n_head", type=int, default=12, help="hparams.json: attention heads")
    t.add_argument("--n_layer", type=int, default=12, help="hparams.json: layers")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_tokenizer(args.corpus, args.vocab_size, args.out, encoding=args.encoding,
                    n_ctx=args.n_ctx, n_embd=args.n_embd, n_head=args.n_head,
                    n_layer=args.n_layer, quiet=args.quiet)
    return 0

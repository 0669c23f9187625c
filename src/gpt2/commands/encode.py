"""``gpt2 encode`` / ``encode.py``: encode text once, train on it many times.

    PYTHONPATH=src ./encode.py [--model_name 124M] [--combine 50000] IN OUT.npz
    python -m gpt2 encode --workers 2 corpus/ corpus.bin

IN is a file, a directory (recursive, sorted) or a glob of text, ``.jsonl``, ``.csv``,
``.parquet``, ``.npz`` or ``.bin`` files, the text kinds also ``.gz``/``.bz2``/``.xz``/``.zst``
compressed (see :mod:`gpt2.data.sources`). OUT's extension picks the format:

- ``.npz``: the original layout (``arr_0``, ``arr_1``, ... one chunk each, compressed), for
  tooling written against the original ``encode.py``;
- ``.bin``: one flat memory-mappable token file (uint16, or uint32 for vocabularies above 65,536)
  with documents separated by ``<|endoftext|>``'s id, plus ``OUT.bin.json`` (chunks, counts,
  encoder fingerprint, sources). Encoded as a stream on every core; not redone when up to date;
- a directory (``OUT/``): ``.bin`` shards of about ``--shard_tokens`` tokens, each with its own
  index; ``--num_shards K --shard_index I`` encodes only the I-th of K disjoint parts of the
  input, for Slurm array jobs or any scheduler.
"""

from __future__ import annotations

import argparse

from ..flags import ArgumentParser
from ..data.encode import default_workers
from ..data.write import encode_corpus
from ..files.paths import resolve_model_dir
from ..tokenizer.files import load_encoder


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2 encode",
        description="Pre-encode text into tokens: OUT.npz (original layout) or OUT.bin "
                    "(flat memory-mapped tokens + OUT.bin.json index).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", default="124M", help="model whose encoder to use (under --models_dir)")
    p.add_argument("--models_dir", default="models", help="folder holding the models")
    p.add_argument("--model_dir", default=None,
                   help="model or tokenizer directory to take the encoder from (overrides --model_name)")
    p.add_argument("--combine", type=int, default=50000, metavar="CHARS",
                   help="gather documents into chunks of at least this many characters")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="encoding processes (default: the number of cores)")
    p.add_argument("--text_field", default="text", metavar="NAME",
                   help="the field holding the text in .jsonl records, the column in .parquet")
    p.add_argument("--literal_endoftext", action="store_true",
                   help="keep <|endoftext|> in text as ordinary text (7 tokens), as the original "
                        "did, instead of separating documents there")
    p.add_argument("--shard_tokens", type=int, default=None, metavar="N",
                   help="with OUT a directory: start a new shard after about N tokens "
                        "(documents are never split; default: one shard)")
    p.add_argument("--num_shards", type=int, default=1, metavar="K",
                   help="split the input into K disjoint parts (for array jobs) ...")
    p.add_argument("--shard_index", type=int, default=0, metavar="I",
                   help="... and encode only part I (0..K-1) into OUT/shard-I-*.bin")
    p.add_argument("--force", action="store_true", help="encode even if OUT is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("in_text", metavar="IN", help="a file, directory or glob")
    p.add_argument("out", metavar="OUT",
                   help="OUT.npz, OUT.bin, or a directory (end it with /) for .bin shards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gpt2.files and gpt2.tokenizer need no torch: encoding never pays for importing it.
    model_dir = resolve_model_dir(args.model_name, args.models_dir, args.model_dir)
    encode_corpus(args.in_text, args.out, load_encoder(model_dir), combine=args.combine,
                  encoding=args.encoding, workers=args.workers, force=args.force,
                  quiet=args.quiet, text_field=args.text_field,
                  split_eot=not args.literal_endoftext, shard_tokens=args.shard_tokens,
                  num_shards=args.num_shards, shard_index=args.shard_index,
                  encoder_dir=model_dir)
    return 0

"""``gpt2 encode`` / ``encode.py``: encode text once, train on it many times.

    PYTHONPATH=src ./encode.py [--model_name 124M] [--combine 50000] IN OUT.npz
    python -m gpt2 encode --workers 2 corpus/ corpus.bin

IN is a file, a directory (recursive, sorted) or a glob of text, ``.jsonl``, ``.csv``, ``.npz``
or ``.bin`` files (see :mod:`gpt2.dataset`). OUT's extension picks the format:

- ``.npz``: the original layout (``arr_0``, ``arr_1``, ... one chunk each, compressed), for
  tooling written against the original ``encode.py``;
- ``.bin``: one flat memory-mappable token file (uint16, or uint32 for vocabularies above 65,536)
  with documents separated by ``<|endoftext|>``'s id, plus ``OUT.bin.json`` (chunks, counts,
  encoder fingerprint, sources). Encoded as a stream on every core; not redone when up to date.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from . import dataset
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--workers", type=int, default=dataset.default_workers(),
                   help="encoding processes (default: the number of cores)")
    p.add_argument("--force", action="store_true", help="encode even if OUT is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("in_text", metavar="IN", help="a file, directory or glob")
    p.add_argument("out", metavar="OUT", help="OUT.npz or OUT.bin")
    return p


def write_npz(chunks: list[np.ndarray], out: Path) -> None:
    """``np.savez_compressed(out, *chunks)``, atomically. int32: what the original fed to TF."""
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp.npz", dir=out.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, *[np.asarray(c, dtype=np.int32) for c in chunks])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode(in_text: str, out: str | os.PathLike, model_dir: str | os.PathLike,
           combine: int = 50000, encoding: str = "utf-8", workers: int | None = None,
           force: bool = False, quiet: bool = False) -> dict | None:
    """Encode ``in_text`` into ``out`` (``.npz`` or ``.bin``) with ``model_dir``'s encoder.

    Returns the ``.bin`` index, or None when the output was already up to date.
    """
    from .encoder import encoder_fingerprint, load_encoder

    out = Path(out)
    if out.suffix not in (".npz", ".bin"):
        raise UserError(f"output {out} must end in .npz or .bin")
    if combine < 0:
        raise UserError(f"--combine must be >= 0, got {combine}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    # An output inside the input directory is not an input (nor its index or temp files).
    ours = {out.resolve(), Path(str(out.resolve()) + dataset.INDEX_SUFFIX)}
    paths = [p for p in dataset.expand_paths(in_text) if p.resolve() not in ours
             and not (p.parent.resolve() == out.parent.resolve()
                      and p.name.startswith(out.name + ".") and p.suffix in (".tmp", ".bin"))]
    if not paths:
        raise UserError(f"{in_text} holds no input files besides the output {out}")
    fingerprint = encoder_fingerprint(model_dir)
    say = (lambda *a: None) if quiet else print
    if out.suffix == ".bin" and not force and dataset.is_up_to_date(
            out, paths, fingerprint, combine, encoding):
        say(f"{out} is up to date (same sources and encoder); nothing to do")
        return None
    encoder = load_encoder(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"Reading {len(paths)} file{'s' * (len(paths) != 1)}")
    target = out if out.suffix == ".bin" else None
    if target is None:
        # .npz is written from a temporary .bin: one encoding pipeline for both formats.
        fd, name = tempfile.mkstemp(prefix=out.name + ".", suffix=".bin", dir=out.parent)
        os.close(fd)
        target = Path(name)
    try:
        index = dataset.encode_to_bin(
            paths, target, encoder, combine=combine, encoding=encoding, workers=workers,
            fingerprint=fingerprint, quiet=quiet, label=out.name,
            extra={"encoder_dir": str(Path(model_dir).resolve())})
        if out.suffix == ".npz":
            say(f"Writing {out}")
            write_npz(dataset.load_token_file(target), out)
    finally:
        if out.suffix == ".npz":
            for p in (target, Path(str(target) + dataset.INDEX_SUFFIX)):
                p.unlink(missing_ok=True)
    say(f"{out}: {index['n_tokens']:,} tokens, {index['n_documents']:,} documents, "
        f"{index['n_chunks']:,} chunks")
    return index


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_dir is not None:
        # Checked here so that encoding never pays for importing torch (via gpt2.checkpoint).
        model_dir = Path(os.path.expanduser(args.model_dir))
        if not model_dir.is_dir():
            raise UserError(f"model directory {model_dir} does not exist")
    else:
        from .checkpoint import resolve_model_dir

        model_dir = resolve_model_dir(args.model_name, args.models_dir)
    encode(args.in_text, args.out, model_dir, combine=args.combine, encoding=args.encoding,
           workers=args.workers, force=args.force, quiet=args.quiet)
    return 0

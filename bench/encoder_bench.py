"""Micro-benchmark of gpt2.encoder on GPT-2's vocabulary: load time and MB/s per backend.

    .venv/bin/python bench/encoder_bench.py [--mb 4] [--threads 2]

Text is Python's own documentation (pydoc_data.topics) repeated to the requested size.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import gpt2_vocab  # noqa: E402

from gpt2.tokenizer import Encoder, load_encoder  # noqa: E402


def timed(label: str, nbytes: int, fn) -> list:
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:7.3f} s  {nbytes / seconds / 1e6:6.2f} MB/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text to encode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[k] for k in sorted(topics))
    text = (prose * int(args.mb * 1e6 / len(prose) + 1))[:int(args.mb * 1e6)]
    nbytes = len(text.encode())
    pieces = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    vocab_dir = gpt2_vocab.vocab_dir()

    load_encoder(vocab_dir)  # warm the page cache
    start = time.perf_counter()
    enc = load_encoder(vocab_dir)
    print(f"load GPT-2 vocabulary: {time.perf_counter() - start:.3f} s ({enc.backend})")

    ids = timed("encode_ordinary, tiktoken", nbytes, lambda: enc.encode_ordinary(text))
    batch = timed(f"encode_ordinary_batch 100 KB x {args.threads} threads", nbytes,
                  lambda: enc.encode_ordinary_batch(pieces, num_threads=args.threads))
    assert [t for b in batch for t in b][:1000] == ids[:1000]

    new_ids = list(range(enc.n_vocab))
    random.Random(0).shuffle(new_ids)
    permuted = Encoder({t: new_ids[i] for t, i in enc.encoder.items()}, enc.bpe_merges)
    mapped = timed(f"encode_ordinary, {permuted.backend}", nbytes,
                   lambda: permuted.encode_ordinary(text))
    assert mapped == [new_ids[i] for i in ids]

    python = Encoder(enc.encoder, enc.bpe_merges, backend="python")
    small = text[:nbytes // 4]
    timed("encode_ordinary, python (1/4 of the text)", len(small.encode()),
          lambda: python.encode_ordinary(small))
    timed("decode", nbytes, lambda: enc.decode(ids))


if __name__ == "__main__":
    main()

"""Corpora as people get them: compressed text, JSON lines and parquet, the literal
<|endoftext|> separator, shards and array-job parts, shards read in place, a sentencepiece
tokenizer trained on the stream, and a startup cost that does not grow with the corpus.

Ids are compared with an independent tiktoken build of GPT-2's vocabulary (test_dataset.py's).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import sources
from gpt2.data.dataset import check_vocab, load_dataset
from gpt2.data.sampler import Sampler
from gpt2.data.sources import expand_paths, split_into_parts
from gpt2.data.splits import split_validation
from gpt2.data.tokens import encode_chunk_table, load_bin, load_token_files
from gpt2.tokenizer.files import load_encoder
from gpt2.data.write import encode_corpus, encode_to_bin
from gpt2.errors import UserError
from test_dataset import EOT, enc, joined, ref  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
DOCS = ["First document.\nIt has two lines.\n", "Second: Ünïcödé 漢字, numbers 12345  \n",
        "\tthird\t\ttabs and   spaces", "fourth, the last one."]


def zstd_bytes(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd_bytes}


def write_parquet(path: Path, texts: list, field: str = "text", row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path,
                   row_group_size=row_group_size)
    return path


def chunk_ids(chunks) -> list[list[int]]:
    return [c.tolist() for c in chunks]


# --- input kinds ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_compressed_text_jsonl_and_csv_give_tiktokens_ids(tmp_path, enc, ref, suffix):
    jsonl = "".join(json.dumps({"body": d}) + "\n" for d in DOCS).encode()
    csv_text = "text\n" + "".join('"' + d.replace('"', '""') + '"\n' for d in DOCS)
    files = {f"a.txt{suffix}": DOCS[0].encode(), f"b.jsonl{suffix}": jsonl,
             f"c.csv{suffix}": csv_text.encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(COMPRESS[suffix](data))
    chunks = load_dataset(tmp_path / f"a.txt{suffix}", enc, combine=0, cache_dir=tmp_path / "c",
                          quiet=True)
    assert chunk_ids(chunks) == [ref.encode_ordinary(DOCS[0])]
    chunks = load_dataset(tmp_path / f"b.jsonl{suffix}", enc, combine=0, text_field="body",
                          cache_dir=tmp_path / "c", quiet=True)
    assert chunk_ids(chunks) == [ref.encode_ordinary(d) for d in DOCS]
    chunks = load_dataset(tmp_path / f"c.csv{suffix}", enc, combine=0, cache_dir=tmp_path / "c",
                          quiet=True)
    assert chunk_ids(chunks) == [ref.encode_ordinary(d) for d in DOCS]


def test_parquet_is_read_by_row_group_with_the_text_field(tmp_path, enc, ref):
    write_parquet(tmp_path / "a.parquet", DOCS, field="content", row_group_size=3)
    chunks = load_dataset(tmp_path / "a.parquet", enc, combine=0, text_field="content",
                          cache_dir=tmp_path / "c", quiet=True)
    assert chunk_ids(chunks) == [ref.encode_ordinary(d) for d in DOCS]
    with pytest.raises(UserError, match=r"a\.parquet: no column 'text'"):
        load_dataset(tmp_path / "a.parquet", enc, cache_dir=tmp_path / "c", quiet=True)


def test_missing_or_non_string_fields_name_the_file_and_row(tmp_path, enc):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": 5}\n'))
    with pytest.raises(UserError, match=r"a\.jsonl\.gz:2: its \"text\" field is int"):
        load_dataset(tmp_path / "a.jsonl.gz", enc, cache_dir=tmp_path / "c", quiet=True)
    write_parquet(tmp_path / "b.parquet", ["fine", None, "also fine"])
    with pytest.raises(UserError, match=r"b\.parquet: row 2: 'text' is null"):
        load_dataset(tmp_path / "b.parquet", enc, cache_dir=tmp_path / "c", quiet=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"c\.parquet: row 1: column 'text' holds int64"):
        load_dataset(tmp_path / "c.parquet", enc, cache_dir=tmp_path / "c", quiet=True)


@pytest.mark.parametrize("name,make", [
    ("bad.txt.gz", lambda: gzip.compress(b"hello world " * 1000)[:-30]),
    ("bad.jsonl.zst", lambda: zstd_bytes(b'{"text": "x"}\n' * 1000)[:40] + b"garbage!"),
    ("bad.txt.xz", lambda: b"not xz at all"),
    ("bad.parquet", lambda: b"PAR1 this is no parquet file"),
])
def test_corrupt_files_are_one_line_errors(tmp_path, name, make, gpt2_vocab_dir, capsys):
    from gpt2.cli import main

    (tmp_path / name).write_bytes(make())
    code = main(["encode", "--model_dir", str(gpt2_vocab_dir), "--quiet", "--workers", "1",
                 str(tmp_path / name), str(tmp_path / "out.bin")])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: "), err
    assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_missing_pyarrow_names_the_extra(tmp_path, enc, monkeypatch):
    write_parquet(tmp_path / "a.parquet", DOCS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match=r"pip install 'gpt2\[parquet\]'"):
        load_dataset(tmp_path / "a.parquet", enc, cache_dir=tmp_path / "c", quiet=True)


# --- <|endoftext|> --------------------------------------------------------------------------

def test_literal_endoftext_separates_documents_unless_asked_not_to(tmp_path, enc, ref,
                                                                   monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 5)  # the marker straddles many blocks
    text = "a story<|endoftext|>another one<|endoftext|><|endoftext|>last<|endoftext|>"
    (tmp_path / "x.txt").write_text(text)
    out = tmp_path / "x.bin"
    encode_to_bin(tmp_path / "x.txt", out, enc, combine=10**9, workers=1, quiet=True)
    docs = ["a story", "another one", "last"]
    assert np.fromfile(out, dtype=np.uint16).tolist() == joined(ref, docs)
    encode_to_bin(tmp_path / "x.txt", out, enc, combine=10**9, workers=1, quiet=True,
                  split_eot=False)
    assert np.fromfile(out, dtype=np.uint16).tolist() == ref.encode_ordinary(text)
    assert ref.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


def test_combine_counts_the_separators_characters_as_the_original(tmp_path, enc):
    # The original appended "<|endoftext|>" (13 characters) after each file while the buffer
    # was short of --combine: 20 + 13 + 20 = 53 >= 50 closes a chunk, 20 + 20 would not.
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("y" * 19 + "\n")
    chunks = load_dataset(tmp_path / "*.txt", enc, combine=50, cache_dir=tmp_path / "c",
                          quiet=True)
    assert [int(np.sum(c == EOT)) for c in chunks] == [1, 1]


# --- shards and parts -----------------------------------------------------------------------

def corpus_of_every_kind(root: Path, n: int = 40) -> list[str]:
    """Text, a big uncompressed .jsonl, a .jsonl.gz and a parquet file; their documents."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "Ünï", "漢字", "42", "\n"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in range(4 * n)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "0.txt").write_text("<|endoftext|>".join(docs[:n]))
    (root / "1.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[n:2 * n]))
    (root / "2.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[2 * n:3 * n]).encode()))
    write_parquet(root / "3.parquet", docs[3 * n:], row_group_size=7)
    return docs


def documents_of(paths: list[Path]) -> list[list[int]]:
    """The documents of token files, in order (split at the end-of-text id)."""
    out = []
    for p in paths:
        flat = np.fromfile(p, dtype=np.uint16)
        cuts = np.flatnonzero(flat == EOT)
        out += [d.tolist() for d in np.split(flat, cuts + 1)]
    return [[t for t in d if t != EOT] for d in out]


def test_shards_and_array_job_parts_reassemble_to_the_whole(tmp_path, enc, ref,
                                                             gpt2_vocab_dir):
    docs = corpus_of_every_kind(tmp_path / "in")
    whole = [ref.encode_ordinary(d) for d in docs]
    gpt2_enc = load_encoder(gpt2_vocab_dir)
    encode_corpus(str(tmp_path / "in"), tmp_path / "whole.bin", gpt2_enc, quiet=True)
    assert documents_of([tmp_path / "whole.bin"]) == whole
    # shards of about 500 tokens: several, each with its own index, no document split
    indexes = encode_corpus(str(tmp_path / "in"), str(tmp_path / "shards") + "/", gpt2_enc,
                            shard_tokens=500, quiet=True)
    shards = sorted((tmp_path / "shards").glob("*.bin"))
    assert len(shards) == len(indexes) > 3
    assert all((s.parent / (s.name + ".json")).is_file() for s in shards)
    assert documents_of(shards) == whole
    # 5 array-job parts, each on its own, into one folder: disjoint, in order, complete
    for i in range(5):
        encode_corpus(str(tmp_path / "in"), str(tmp_path / "parts") + "/", gpt2_enc,
                      shard_tokens=300, num_shards=5, shard_index=i, quiet=True)
    parts = sorted((tmp_path / "parts").glob("*.bin"))
    assert len({p.name.split("-")[1] for p in parts}) == 5  # every part wrote shards
    assert documents_of(parts) == whole
    # the big .jsonl and the parquet file are spread over several parts
    plan = split_into_parts(expand_paths(tmp_path / "in"), 5)
    spread = {p.path.name: sum(1 for part in plan for q in part if q.path == p.path)
              for part in plan for p in part}
    assert spread["1.jsonl"] > 1 and spread["3.parquet"] > 1


def test_a_glob_of_shards_trains_in_place_and_leaves_the_cache_untouched(tmp_path,
                                                                        monkeypatch):
    from gpt2.commands.train import main as train_main
    from test_train import args, make_model_dir, synthetic_text

    model_dir = make_model_dir(tmp_path / "tiny")
    text = synthetic_text(8000).replace(". ", ".<|endoftext|>")
    (tmp_path / "corpus.txt").write_text(text)
    encode_corpus(str(tmp_path / "corpus.txt"), str(tmp_path / "shards") + "/",
                  load_encoder(model_dir), shard_tokens=4000, quiet=True, encoder_dir=model_dir)
    n_shards = len(list((tmp_path / "shards").glob("*.bin")))
    assert n_shards >= 5
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert train_main(args(str(tmp_path / "shards" / "*.bin"), model_dir, max_steps=2,
                           val_every=2, val_batch_count=2)) == 0
    assert not cache.exists() or not any(cache.rglob("*"))
    rows = [json.loads(line) for line in (tmp_path / "checkpoint/run1/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "val_loss" in rows[-1]


def test_held_out_validation_of_shards_is_whole_shards(tmp_path, enc):
    paths = []
    for i, n in enumerate([100, 100, 100, 40]):
        p = tmp_path / f"s{i}.bin"
        np.arange(n, dtype=np.uint16).tofile(p)
        index = {"format": "gpt2-tokens", "version": 2, "dtype": "uint16", "n_tokens": n,
                 "n_vocab": 50257, "chunk_table": encode_chunk_table(np.array([[0, n]]))}
        (tmp_path / f"s{i}.bin.json").write_text(json.dumps(index))
        paths.append(p)
    chunks = load_token_files(paths)
    train, val, message = split_validation(chunks, 0.25)
    assert val.n_tokens == 140 and train.n_tokens == 200 and "last 2 of 4 shards" in message
    one, val1, _ = split_validation(load_token_files(paths[:1]), 0.25)  # one shard: cut tokens
    assert val1.n_tokens == 25 and one.n_tokens == 75


# --- startup cost does not grow with the corpus ----------------------------------------------

def sparse_corpus(path: Path, n_tokens: int, chunk: int = 11000) -> Path:
    """An OpenWebText-sized .bin without the disk space: a sparse file and its index."""
    with open(path, "wb") as f:
        f.truncate(n_tokens * 2)
    starts = np.arange(0, n_tokens - chunk, chunk + 1, dtype=np.int64)
    table = np.stack([starts, np.full(len(starts), chunk, dtype=np.int64)], axis=1)
    index = {"format": "gpt2-tokens", "version": 2, "dtype": "uint16", "n_tokens": n_tokens,
             "n_vocab": 50257, "encoder_fingerprint": "x", "chunk_table": encode_chunk_table(table)}
    (path.parent / (path.name + ".json")).write_text(json.dumps(index))
    return path


def test_a_9e9_token_corpus_opens_without_reading_it(tmp_path):
    path = sparse_corpus(tmp_path / "owt.bin", 9_000_000_000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    chunks = load_bin(path)
    check_vocab(chunks, 50257, str(path))  # from the index: no token is read
    batch = Sampler(chunks, seed=0).sample_batch(4, 1024)
    elapsed = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # MB
    assert len(chunks) > 800_000 and batch.shape == (4, 1024)
    assert elapsed < 5 and grown < 100, (elapsed, grown)
    with pytest.raises(UserError, match="encoded for a vocabulary of 50257 ids"):
        check_vocab(chunks, 1000, str(path))


# --- sentencepiece --------------------------------------------------------------------------

def test_sentencepiece_tokenizer_from_a_stream_trains_a_model(tmp_path, monkeypatch):
    import sentencepiece as spm

    from gpt2.commands.tokenizer import main as tokenizer_main
    from gpt2.commands.train import main as train_main
    from gpt2.tokenizer import load_encoder
    from test_train import synthetic_text

    docs = [synthetic_text(300, seed=i) for i in range(30)]
    (tmp_path / "c.jsonl.zst").write_bytes(zstd_bytes(
        "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    for model_type in ("unigram", "bpe"):
        out = tmp_path / model_type
        assert tokenizer_main(["train", str(tmp_path / "c.jsonl.zst"), "--type", "sentencepiece",
                               "--model_type", model_type, "--vocab_size", "400", "--out",
                               str(out), "--n_ctx", "32", "--n_embd", "32", "--n_head", "4",
                               "--n_layer", "2", "--quiet"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["hparams.json", "sp.model"]
        sp = spm.SentencePieceProcessor(model_file=str(out / "sp.model"))
        assert sp.get_piece_size() == json.loads((out / "hparams.json").read_text())["n_vocab"]
        assert sp.piece_to_id("<|endoftext|>") != sp.unk_id()
        enc = load_encoder(out)
        assert enc.eot_token == sp.piece_to_id("<|endoftext|>")
        chunks = load_dataset(tmp_path / "c.jsonl.zst", enc, combine=0,
                              cache_dir=tmp_path / "cache", quiet=True)
        assert chunk_ids(chunks) == [sp.encode(d) for d in docs]  # sentencepiece's own ids
    assert sp.encode("ß€") and sp.unk_id() not in sp.encode("ß€☃")  # byte fallback
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    assert train_main(["--dataset", str(tmp_path / "c.jsonl.zst"), "--model_dir",
                       str(tmp_path / "unigram"), "--init", "fresh", "--max_steps", "2",
                       "--batch_size", "2", "--sample_every", "2", "--sample_length", "4",
                       "--save_every", "0"]) == 0
    assert (tmp_path / "checkpoint/run1/model-2/sp.model").is_file()

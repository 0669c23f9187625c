"""gpt2.data: files -> token chunks (ids checked against tiktoken), Sampler, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2_vocab
from gpt2.data import encode as data_encode
from gpt2.data import sources
from gpt2.data.dataset import load_dataset
from gpt2.data.encode import pieces, splits_cleanly
from gpt2.data.write import encode_to_bin
from gpt2.data.sampler import Sampler, validation_batches
from gpt2.data.sources import expand_paths
from gpt2.data.tokens import chunk_table as _chunk_table
from gpt2.data.splits import find_corpus_splits, split_validation
from gpt2.errors import UserError

EOT = 50256
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenEncoder:
    """The Encoder interface over an independent tiktoken build of GPT-2's vocabulary."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc, self.n_vocab, self.eot_token = enc, enc.n_vocab, enc.eot_token

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


@pytest.fixture(scope="session")
def ref() -> tiktoken.Encoding:
    ranks = gpt2_vocab._tiktoken_ranks()
    return tiktoken.Encoding("gpt2-test", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


@pytest.fixture(scope="session")
def enc(ref) -> TiktokenEncoder:
    return TiktokenEncoder(ref)


def joined(ref, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, d in enumerate(docs):
        out += ([EOT] if i else []) + ref.encode_ordinary(d)
    return out


DOCS = {
    "a.txt": "Hello world.\nIt's GPT-2's data layer, isn't it?\n",
    "b/c.txt": "Ünïcödé   spaces\t\ttabs\n\n\nand 12345 numbers  \n",
    "b/d.md": "  leading spaces\r\nwindows line ends\r\n<|endoftext|> as text\n",
    "e.txt": "\u00a0non-breaking\u2003em space\u3000ideographic 漢字",
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    (root / ".hidden").write_text("never read")
    return root


def texts_in_order() -> list[str]:
    # Universal newlines, as open() reads text; sorted by path; a literal <|endoftext|> ends a
    # document (b/d.md holds two).
    return [doc for k in sorted(DOCS) for doc in
            DOCS[k].replace("\r\n", "\n").split("<|endoftext|>") if doc]


def test_expand_paths_sorted_recursive_glob_and_errors(corpus, tmp_path):
    rel = [p.relative_to(corpus).as_posix() for p in expand_paths(corpus)]
    assert rel == sorted(DOCS)
    assert [p.name for p in expand_paths(str(corpus / "**" / "*.txt"))] == ["a.txt", "c.txt", "e.txt"]
    assert expand_paths(corpus / "a.txt") == [corpus / "a.txt"]
    with pytest.raises(UserError, match="matches no files"):
        expand_paths(tmp_path / "nothing*.txt")


@pytest.mark.parametrize("combine", [0, 10**9])
def test_load_dataset_ids_equal_tiktoken(corpus, enc, ref, tmp_path, combine):
    chunks = load_dataset(corpus, enc, combine=combine, cache_dir=tmp_path / "cache", quiet=True)
    docs = texts_in_order()
    if combine == 0:  # one chunk per document, no separators inside
        assert [c.tolist() for c in chunks] == [ref.encode_ordinary(d) for d in docs]
    else:  # one chunk; documents separated by the id, never by the text's ~7 tokens
        assert [c.tolist() for c in chunks] == [joined(ref, docs)]
        assert int(np.sum(chunks[0] == EOT)) == len(docs) - 1


def test_combine_is_minimum_characters_per_chunk(tmp_path, enc, ref):
    sizes = [30, 30, 100, 10, 10]
    for i, n in enumerate(sizes):
        (tmp_path / f"{i}.txt").write_text("x" * (n - 1) + "\n")
    chunks = load_dataset(tmp_path / "*.txt", enc, combine=50, cache_dir=tmp_path / "c", quiet=True)
    # 30+30 >= 50 closes a chunk; 100 alone; the 10+10 leftover is the last chunk.
    docs = ["x" * (n - 1) + "\n" for n in sizes]
    assert [c.tolist() for c in chunks] == [joined(ref, docs[:2]), joined(ref, docs[2:3]),
                                            joined(ref, docs[3:])]


def test_jsonl_and_csv_one_document_per_record(tmp_path, enc, ref):
    recs = ["first record\nwith a newline", "second, with \"quotes\"", "third 3"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n"
                                              for i, r in enumerate(recs)) + "\n")
    import csv
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for r in recs:
            w.writerow([r, "x"])
    for name in ("a.jsonl", "b.csv"):
        chunks = load_dataset(tmp_path / name, enc, combine=10**9, cache_dir=tmp_path / "c",
                                quiet=True)
        assert [c.tolist() for c in chunks] == [joined(ref, recs)], name


def test_bad_jsonl_record_names_file_and_line(tmp_path, enc):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: .*\"text\""):
        load_dataset(tmp_path / "a.jsonl", enc, cache_dir=tmp_path / "c", quiet=True)


def test_undecodable_bytes_name_the_file(tmp_path, enc):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UserError, match=r"bad\.txt: byte 3 is not valid utf-8"):
        load_dataset(tmp_path, enc, cache_dir=tmp_path / "c", quiet=True)
    chunks = load_dataset(tmp_path, enc, encoding="latin-1", combine=0,
                            cache_dir=tmp_path / "c", quiet=True)
    assert enc.decode(chunks[0]) == "café latin-1"


def test_empty_files_skipped_but_empty_data_is_an_error(tmp_path, enc, ref, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text to encode"):
        load_dataset(tmp_path / "empty.txt", enc, cache_dir=tmp_path / "c", quiet=True)
    (tmp_path / "full.txt").write_text("some text")
    chunks = load_dataset(tmp_path / "*.txt", enc, cache_dir=tmp_path / "c")
    assert [c.tolist() for c in chunks] == [ref.encode_ordinary("some text")]
    assert "empty.txt holds no text" in capsys.readouterr().err


def test_corrupt_npz_is_a_user_error(tmp_path, enc):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"x\.npz: not a readable \.npz"):
        load_dataset(tmp_path / "x.npz", enc, quiet=True)


def test_npz_passes_through_and_mixes_with_text(tmp_path, enc, ref):
    arrays = [np.arange(10, 20), np.arange(5)]
    np.savez_compressed(tmp_path / "a.npz", *arrays)
    chunks = load_dataset(tmp_path / "a.npz", enc, quiet=True)
    assert [c.tolist() for c in chunks] == [a.tolist() for a in arrays]
    (tmp_path / "b.txt").write_text("then text")
    chunks = load_dataset(tmp_path, enc, cache_dir=tmp_path / "c", quiet=True)
    assert [c.tolist() for c in chunks] == [a.tolist() for a in arrays] + [
        ref.encode_ordinary("then text")]


def test_bin_round_trip_and_flat_layout(corpus, enc, ref, tmp_path):
    out = tmp_path / "out.bin"
    index = encode_to_bin(corpus, out, enc, combine=60, workers=2, quiet=True)
    flat = np.fromfile(out, dtype=np.uint16)
    # The flat file is every document separated by the id; chunks are views into it.
    assert flat.tolist() == joined(ref, texts_in_order())
    assert index["dtype"] == "uint16" and index["n_tokens"] == len(flat)
    assert index["n_documents"] == len(texts_in_order())
    chunks = load_dataset(out, enc, quiet=True)
    assert all(isinstance(c, np.memmap) for c in chunks)
    table = _chunk_table(index)
    assert [c.tolist() for c in chunks] == [flat[s:s + n].tolist() for s, n in table]
    assert np.concatenate([np.append(c, EOT) for c in chunks])[:-1].tolist() == flat.tolist()
    with pytest.raises(UserError, match="index"):
        (tmp_path / "out.bin.json").unlink()
        load_dataset(out, enc, quiet=True)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_streaming_pieces_give_whole_file_ids(tmp_path, enc, ref, monkeypatch, backend):
    # Tiny blocks and pieces so one file is cut hundreds of times, "\r\n" straddles blocks,
    # and tasks run on 2 worker processes; ids must equal encoding the file whole.
    monkeypatch.setattr(sources, "READ_BYTES", 997)
    monkeypatch.setattr(data_encode, "PIECE_CHARS", 300)
    monkeypatch.setattr(data_encode, "TASK_CHARS", 700)
    rng = np.random.default_rng(0)
    words = ["the", "  ", "\n", "\r\n", "\t", "GPT-2's", "漢字", "x", "  \n", "!!", "12", " "]
    text = "".join(rng.choice(words, size=40000))
    (tmp_path / "big.txt").write_bytes(text.encode())
    out = tmp_path / "big.bin"
    encode_to_bin(tmp_path / "big.txt", out, enc, combine=0, workers=2, backend=backend,
                  quiet=True)
    assert np.fromfile(out, dtype=np.uint16).tolist() == ref.encode_ordinary(
        (tmp_path / "big.txt").read_text())


class PrefixEncoder(TiktokenEncoder):
    """Adds a marker per call, like sentencepiece's prefix space: cutting would change ids."""

    def encode_ordinary(self, text):
        return [7] + super().encode_ordinary(text)


def test_encoders_that_cannot_be_cut_get_whole_documents(tmp_path, ref, monkeypatch):
    monkeypatch.setattr(data_encode, "PIECE_CHARS", 10)
    enc = PrefixEncoder(ref)
    assert not splits_cleanly(enc)
    docs = ["a long first document, " * 20, "and a second one " * 9]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    chunks = load_dataset(tmp_path, enc, combine=0, cache_dir=tmp_path / "c", quiet=True)
    assert [c.tolist() for c in chunks] == [[7] + ref.encode_ordinary(d) for d in docs]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab 1\n\t'.é漢") + ["\u00a0", "\u2028", "\x1c", "\r",
                                                         "'s", "  ", " \n", "\u3000"])).map("".join),
       st.integers(1, 12))
def test_cut_points_never_change_ids(enc, text, piece):
    cut = [t for t, _, _ in pieces([(text, 0)], piece, splittable=True)]
    assert "".join(cut) == text
    assert [i for p in cut for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_cache_reused_and_invalidated_by_content(corpus, enc, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load_dataset(corpus, enc, cache_dir=cache)
    assert "Using cached" not in capsys.readouterr().out
    again = load_dataset(corpus, enc, cache_dir=cache)
    assert "Using cached" in capsys.readouterr().out
    assert [c.tolist() for c in first] == [c.tolist() for c in again]
    (corpus / "a.txt").write_text("changed")
    load_dataset(corpus, enc, cache_dir=cache, quiet=True)
    assert len(list(cache.glob("*.bin"))) == 2


# ----------------------------------------------------------------------------- Sampler

def tagged_chunks(lengths):
    # Token value = global position, so a window tells where it came from.
    out, pos = [], 0
    for n in lengths:
        out.append(np.arange(pos, pos + n))
        pos += n
    return out


def test_sampler_reaches_every_valid_start_and_respects_boundaries():
    chunks = tagged_chunks([5, 2, 8, 3])
    L = 3
    valid = {(int(c[0]) + s) for c in chunks if len(c) >= L for s in range(len(c) - L + 1)}
    sampler = Sampler(chunks, seed=0)
    seen = {}
    for _ in range(400):
        for w in sampler.sample_batch(4, L):
            assert w.dtype == np.int64 and len(w) == L
            assert any(np.array_equal(w, c[s:s + L]) for c in chunks for s in range(len(c)))
            seen[int(w[0])] = seen.get(int(w[0]), 0) + 1
    assert set(seen) == valid  # includes windows ending on a chunk's last token
    counts = np.array(list(seen.values()))
    assert counts.min() > 0.5 * counts.mean()  # uniform over starts, roughly
    assert sampler.n_tokens == 18


def test_sampler_seeded_ranks_and_resume():
    chunks = tagged_chunks([100, 50, 300])
    a, b = Sampler(chunks, seed=7), Sampler(chunks, seed=7)
    assert np.array_equal(a.sample_batch(4, 16), b.sample_batch(4, 16))
    r1 = Sampler(chunks, seed=7, rank=1, world_size=2)
    assert not np.array_equal(Sampler(chunks, seed=7).sample_batch(4, 16), r1.sample_batch(4, 16))

    straight = Sampler(chunks, seed=3)
    expected = [straight.sample_batch(2, 10) for _ in range(6)]
    first = Sampler(chunks, seed=3)
    got = [first.sample_batch(2, 10) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Sampler(chunks, seed=None)
    resumed.load_state_dict(state)
    got += [resumed.sample_batch(2, 10) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(expected, got))
    assert Sampler(chunks).seed != Sampler(chunks).seed  # unseeded: random, but recorded


def test_sampler_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match="train.txt has no document of at least 1024 tokens"):
        Sampler(tagged_chunks([1000, 10]), seed=0, name="train.txt").sample(1024)
    assert len(Sampler(tagged_chunks([1024]), seed=0).sample(1024)) == 1024


def test_validation_batches_fixed():
    chunks = tagged_chunks([200, 300])
    a = validation_batches(chunks, 3, 2, 32)
    b = validation_batches(chunks, 3, 2, 32)
    assert len(a) == 3 and a[0].shape == (2, 32)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_split_validation_cuts_last_fraction():
    chunks = tagged_chunks([100, 70, 30])
    train, val, msg = split_validation(chunks, 0.25)
    assert sum(map(len, val)) == 50 and sum(map(len, train)) == 150
    assert np.concatenate(list(train) + list(val)).tolist() == list(range(200))
    assert [len(c) for c in val] == [20, 30]  # cut inside the second chunk; boundaries kept
    assert "50 of 200 tokens" in msg
    again = split_validation(chunks, 0.25)
    assert all(np.array_equal(x, y) for x, y in zip(val, again[1]))
    with pytest.raises(UserError, match="val_fraction"):
        split_validation(chunks, 1.5)


def test_find_corpus_splits(tmp_path):
    assert find_corpus_splits(tmp_path) is None
    (tmp_path / "train").mkdir()
    assert find_corpus_splits(tmp_path) is None
    (tmp_path / "val").mkdir()
    assert find_corpus_splits(tmp_path) == {"train": tmp_path / "train",
                                              "valid": tmp_path / "val", "test": None}
    (tmp_path / "valid").mkdir()
    (tmp_path / "test").mkdir()
    assert find_corpus_splits(tmp_path) == {"train": tmp_path / "train",
                                              "valid": tmp_path / "valid",
                                              "test": tmp_path / "test"}

"""The BPE encoder against independent implementations: tiktoken running GPT-2's ranks with the
original regex, and a pure-Python BPE written here like OpenAI's src/encoder.py."""

from __future__ import annotations

import json
import re
import pickle
import random
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpt2_vocab
from gpt2.tokenizer import (ENCODER_FILES, Encoder, bytes_to_unicode, copy_encoder_files,
                          encoder_fingerprint, get_encoder, load_encoder)
from gpt2.errors import UserError

ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- references

class ReferenceBPE:
    """OpenAI's encoder algorithm, restated: regex pieces, bytes -> unicode, lowest-rank pair
    merged everywhere, repeat. Reads the files the way the original does."""

    def __init__(self, vocab_dir: Path, encoder_name="encoder.json", merges_name="vocab.bpe"):
        self.encoder = json.loads((vocab_dir / encoder_name).read_text(encoding="utf-8"))
        lines = (vocab_dir / merges_name).read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_encoder = gpt2_vocab._bytes_to_unicode()
        self.pat = regex.compile(ORIGINAL_PATTERN)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while True:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            ranked = [p for p in pairs if p in self.ranks]
            if not ranked:
                break
            best = min(ranked, key=self.ranks.__getitem__)
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == list(best):
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


@pytest.fixture(scope="module")
def reference_tiktoken() -> tiktoken.Encoding:
    """GPT-2 through tiktoken, built from the whisper ranks with the ORIGINAL regex."""
    return tiktoken.Encoding("gpt2-original-regex", pat_str=ORIGINAL_PATTERN,
                             mergeable_ranks=gpt2_vocab._tiktoken_ranks(),
                             special_tokens={EOT: 50256})


@pytest.fixture(scope="module")
def enc(gpt2_vocab_dir) -> Encoder:
    return load_encoder(gpt2_vocab_dir)


@pytest.fixture(scope="module")
def prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# Pieces that stress the pre-tokenizer: whitespace runs, contractions, digits in several
# scripts, emoji (with ZWJ and skin tones), combining marks, CJK, control characters.
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000", "'s", "'t",
          "'re", "'ve", "'m", "'ll", "'d", "'S", "n't", "123", "1,000.5", "٣٤", "Ⅻ", "😀",
          "👩‍👩‍👧", "👍🏽", "e\u0301", "\u0308", "中文字", "ひらがな", "Ünïcödé", "\x00", "\x7f",
          "--", "...", "!!", EOT, "<|", "|>", "endoftext", "a", "The", " the"]
texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(PIECES)), max_size=24).map(
    "".join)

# tiktoken's Rust regex has older Unicode tables than the `regex` package: characters assigned
# since (new CJK extensions, scripts) are letters/digits to `regex` but not to tiktoken, so the
# two split them differently (test_unicode_tables). Comparisons of a tiktoken-backed encoder
# with a `regex`-based one leave those characters out.
_BYTE_RANKS = {bytes([b]): b for b in range(256)}
_TT_LETTER_OR_DIGIT = tiktoken.Encoding("ln", pat_str=r"[\p{L}\p{N}]",
                                        mergeable_ranks=_BYTE_RANKS, special_tokens={})
_RE_LETTER_OR_DIGIT = regex.compile(r"[\p{L}\p{N}]")


def _same_in_both_tables(c: str) -> bool:
    return bool(_TT_LETTER_OR_DIGIT.encode_ordinary(c)) == bool(_RE_LETTER_OR_DIGIT.match(c))


common_texts = texts.map(lambda s: "".join(filter(_same_in_both_tables, s)))


def train_vocab(text: str, out: Path, vocab_size: int = 600, specials=(EOT,)) -> Path:
    """A small byte-level BPE trained with Hugging Face tokenizers, saved as vocab.json +
    merges.txt (HF names) in ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))
    return out


def write_bpe(out: Path, encoder: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                   encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, prose) -> Path:
    """A non-GPT-2 vocabulary in our layout: special token first, bytes in sorted order."""
    hf = train_vocab(prose, tmp_path_factory.mktemp("hf"))
    out = tmp_path_factory.mktemp("small")
    copy_encoder_files(hf, out)
    return out


@pytest.fixture(scope="module")
def permuted_vocab(tmp_path_factory, small_vocab) -> Path:
    """small_vocab with its ids shuffled: same tokens and merges, different numbering."""
    encoder = json.loads((small_vocab / "encoder.json").read_text(encoding="utf-8"))
    new_ids = list(range(len(encoder)))
    random.Random(0).shuffle(new_ids)
    encoder = {t: new_ids[i] for t, i in encoder.items()}
    out = tmp_path_factory.mktemp("permuted")
    (out / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (out / "vocab.bpe").write_bytes((small_vocab / "vocab.bpe").read_bytes())
    return out


# ----------------------------------------------------------------------------- GPT-2

def test_gpt2_vocab_files_are_openais(gpt2_vocab_dir):
    assert gpt2_vocab.sha256(gpt2_vocab_dir / "encoder.json") == gpt2_vocab.ENCODER_JSON_SHA256
    assert gpt2_vocab.sha256(gpt2_vocab_dir / "vocab.bpe") == gpt2_vocab.VOCAB_BPE_SHA256


def test_known_answers(enc):
    assert enc.backend == "tiktoken"
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert enc.encode(EOT + EOT) == [50256, 50256]
    # The original's behaviour: the literal text is split into ordinary tokens.
    ordinary = enc.encode_ordinary(EOT)
    assert ordinary == [27, 91, 437, 1659, 5239, 91, 29]
    assert 50256 not in ordinary and enc.decode(ordinary) == EOT
    assert enc.decode([50256]) == EOT
    assert enc.encode("") == [] and enc.decode([]) == ""


def test_gpt2_matches_tiktoken_reference_on_prose(enc, reference_tiktoken, prose):
    assert enc.encode_ordinary(prose) == reference_tiktoken.encode_ordinary(prose)
    text = prose[:50000] + EOT + prose[50000:100000]
    assert enc.encode(text) == reference_tiktoken.encode(text, allowed_special={EOT})
    assert enc.decode(enc.encode(prose)) == prose


def test_gpt2_python_backend_matches_reference_on_prose(gpt2_vocab_dir, enc, prose):
    ref = ReferenceBPE(gpt2_vocab_dir)
    py = Encoder(enc.encoder, enc.bpe_merges, backend="python")
    assert py.backend == "python"
    text = prose[:150000]
    expected = ref.encode(text)
    assert py.encode_ordinary(text) == expected
    assert enc.encode_ordinary(text) == expected
    assert py.encode("a" + EOT + "b") == enc.encode("a" + EOT + "b")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_gpt2_matches_tiktoken_reference_on_random_text(enc, reference_tiktoken, text):
    ids = enc.encode_ordinary(text)
    assert ids == reference_tiktoken.encode_ordinary(text)
    assert enc.encode(text) == reference_tiktoken.encode(text, allowed_special={EOT})
    assert enc.decode(ids) == text


def test_unicode_tables():
    """Where tiktoken's character classes and the `regex` package's differ, over all of Unicode:
    never on whitespace, and only in one direction (regex knows newer letters and digits)."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    for cls, newer in [(r"\s", 0), (r"\p{L}", 20000), (r"\p{N}", 500)]:
        tt = tiktoken.Encoding("c", pat_str=cls, mergeable_ranks=_BYTE_RANKS, special_tokens={})
        tt_chars = set(tt.decode_bytes(tt.encode_ordinary(everything)).decode())
        re_chars = set(regex.findall(cls, everything))
        assert tt_chars <= re_chars, cls
        assert len(re_chars - tt_chars) <= newer, cls
        assert not any(ord(c) < 0x500 for c in re_chars - tt_chars)
    assert not _same_in_both_tables("\U0003d000")  # CJK Extension J: Unicode 17
    assert _same_in_both_tables("a") and _same_in_both_tables("中")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=common_texts)
def test_gpt2_python_backend_on_random_text(enc, reference_tiktoken, text):
    py = _python_gpt2(enc)
    assert py.encode_ordinary(text) == reference_tiktoken.encode_ordinary(text)
    assert py.encode(text) == enc.encode(text)


_PY_CACHE: dict[int, Encoder] = {}


def _python_gpt2(enc: Encoder) -> Encoder:
    if id(enc) not in _PY_CACHE:
        _PY_CACHE[id(enc)] = Encoder(enc.encoder, enc.bpe_merges, backend="python")
    return _PY_CACHE[id(enc)]


def test_decode_replaces_invalid_utf8_and_checks_ids(enc):
    b2u = bytes_to_unicode()
    ids = [enc.encoder[b2u[b]] for b in "é".encode()]  # one token per byte
    assert enc.decode_bytes(ids) == "é".encode()
    assert enc.decode(ids[:1]) == "\ufffd"
    assert enc.decode_bytes(ids[:1]) == "é".encode()[:1]
    import numpy as np
    import torch

    assert enc.decode(np.asarray(ids)) == enc.decode(torch.tensor(ids)) == "é"
    assert enc.decode(iter(ids)) == "é"
    with pytest.raises(ValueError, match="50257"):
        enc.decode([1, 50257])
    with pytest.raises(ValueError, match="-1"):
        enc.decode([-1])


def test_lone_surrogates_become_replacement_characters(enc):
    assert enc.encode("a\ud800b") == enc.encode("a\ufffdb")
    assert _python_gpt2(enc).encode("a\ud800b") == enc.encode("a\ufffdb")


def test_batches_equal_single_calls(enc, prose):
    docs = [prose[i:i + 3000] for i in range(0, 60000, 3000)] + ["", EOT, "x" + EOT + "y"]
    singles_ordinary = [enc.encode_ordinary(d) for d in docs]
    singles = [enc.encode(d) for d in docs]
    assert enc.encode_ordinary_batch(docs, num_threads=2) == singles_ordinary
    assert enc.encode_batch(docs, num_threads=2) == singles
    py = _python_gpt2(enc)
    assert py.encode_ordinary_batch(docs[:5]) == singles_ordinary[:5]
    assert py.encode_batch(docs[-3:]) == singles[-3:]


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert table == gpt2_vocab._bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    table[0] = "x"  # a fresh dict each call
    assert bytes_to_unicode()[0] == "Ā"


def test_pickle_round_trip(enc):
    enc2 = pickle.loads(pickle.dumps(enc))
    assert enc2.backend == "tiktoken" and enc2.fingerprint == enc.fingerprint
    assert enc2.encode("Hello world" + EOT) == [15496, 995, 50256]


def test_fingerprint_and_hf_names(gpt2_vocab_dir, enc, tmp_path, prose):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_bytes((gpt2_vocab_dir / "encoder.json").read_bytes())
    (hf / "merges.txt").write_bytes((gpt2_vocab_dir / "vocab.bpe").read_bytes())
    hf_enc = load_encoder(hf)
    assert hf_enc.backend == "tiktoken"
    assert hf_enc.encode(prose[:20000] + EOT) == enc.encode(prose[:20000] + EOT)
    # Same bytes, same fingerprint; copying writes our names and keeps the fingerprint.
    assert encoder_fingerprint(hf) == encoder_fingerprint(gpt2_vocab_dir) == enc.fingerprint
    out = tmp_path / "ours"
    written = copy_encoder_files(hf, out)
    assert [p.name for p in written] == list(ENCODER_FILES["bpe"])
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "vocab.bpe"]
    assert encoder_fingerprint(out) == enc.fingerprint
    copy_encoder_files(out, out)  # onto itself: nothing changes
    assert encoder_fingerprint(out) == enc.fingerprint
    (out / "vocab.bpe").write_text((out / "vocab.bpe").read_text() + "\n")
    assert encoder_fingerprint(out) != enc.fingerprint


def test_get_encoder_uses_model_aliases(gpt2_vocab_dir, tmp_path):
    copy_encoder_files(gpt2_vocab_dir, tmp_path / "models" / "117M")
    enc = get_encoder("124M", models_dir=tmp_path / "models")
    assert enc.encode("hello world") == [31373, 995]
    with pytest.raises(UserError, match="355M"):
        get_encoder("355M", models_dir=tmp_path / "models")


def test_gpt2s_own_merges_skip_the_canonical_check(gpt2_vocab_dir, monkeypatch):
    """Loading GPT-2 stays fast: its merges are known to be canonical, so the 0.4 s check is
    skipped (checked by call, not by a timing that a busy machine would break)."""
    from gpt2.tokenizer import bpe

    def refuse(*a):
        raise AssertionError("the canonical check ran for GPT-2's own merges")

    monkeypatch.setattr(bpe, "_merges_are_canonical", refuse)
    assert load_encoder(gpt2_vocab_dir).backend == "tiktoken"


# ----------------------------------------------------------------------------- other vocabularies

def test_hf_trained_vocab_matches_reference(small_vocab, prose):
    enc = load_encoder(small_vocab)
    assert enc.backend == "tiktoken+lookup"  # HF puts the special token first
    assert enc.n_vocab == 600 and enc.eot_token == 0
    ref = ReferenceBPE(small_vocab)
    text = prose[:120000]
    assert enc.encode_ordinary(text) == ref.encode(text)
    assert enc.encode("hi" + EOT + "there") == ref.encode("hi") + [0] + ref.encode("there")
    assert enc.decode(enc.encode(text)) == text


def test_hf_trained_vocab_matches_hf_tokenizers(small_vocab, prose):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(small_vocab / "encoder.json"),
                                         str(small_vocab / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = prose[:50000]
    assert load_encoder(small_vocab).encode_ordinary(text) == tok.encode(text).ids


def test_permuted_ids_use_the_lookup(permuted_vocab, prose):
    enc = load_encoder(permuted_vocab)
    assert enc.backend == "tiktoken+lookup"
    ref = ReferenceBPE(permuted_vocab)
    text = prose[:60000]
    assert enc.encode_ordinary(text) == ref.encode(text)
    assert enc.encode(EOT) == [ref.encoder[EOT]]
    assert enc.encode_ordinary_batch([text[:5000], text[5000:9000]], num_threads=2) == \
        [ref.encode(text[:5000]), ref.encode(text[5000:9000])]
    assert enc.decode(enc.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=common_texts)
def test_small_vocabs_on_random_text(small_vocab, permuted_vocab, text):
    for d in (small_vocab, permuted_vocab):
        enc, ref = _cached(d)
        assert enc.encode_ordinary(text) == ref.encode(text)
        assert enc.decode(enc.encode(text)) == text


_CACHE: dict[Path, tuple[Encoder, ReferenceBPE]] = {}


def _cached(d: Path):
    if d not in _CACHE:
        _CACHE[d] = (load_encoder(d), ReferenceBPE(d))
    return _CACHE[d]


def _byte_vocab() -> dict[str, int]:
    return {c: i for i, c in enumerate(bytes_to_unicode().values())}


@pytest.mark.parametrize("case", ["non_canonical", "duplicate_result",
                                  "unreachable_part", "out_of_order"])
def test_vocabularies_tiktoken_cannot_run_fall_back_to_python(tmp_path, case):
    # "abc" is merged as (a, bc) but BPE reaches (ab, c) first: tiktoken would still make "abc".
    merges = {"non_canonical": [("a", "b"), ("b", "c"), ("a", "bc")],
              "duplicate_result": [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")],
              "unreachable_part": [("a", "b"), ("ab", "cd"), ("c", "d")],
              "out_of_order": [("ab", "a"), ("a", "b")]}[case]
    encoder = _byte_vocab()
    for a, b in merges:
        if (a + b) not in encoder:
            encoder[a + b] = len(encoder)
    encoder[EOT] = len(encoder)
    d = write_bpe(tmp_path / case, encoder, merges)
    enc, ref = load_encoder(d), ReferenceBPE(d)
    assert enc.backend == "python"
    for text in ["abc", "abcd abcd", "ababab", "aabbcc abcabc", "x" + "abc" * 5, "ba cab"]:
        assert enc.encode_ordinary(text) == ref.encode(text), text
        assert enc.decode(enc.encode(text)) == text
    assert enc.encode("abc" + EOT) == ref.encode("abc") + [encoder[EOT]]


@pytest.mark.parametrize("merges,says", [
    ([("a", "b"), ("ab", "c")], "line 3: merge 'ab c': the token it makes 'abc' is not in"),
    ([("a", "b"), ("q", "ZZ")], "line 3: merge 'q ZZ': the symbol 'ZZ' is not in"),
])
def test_merges_that_do_not_match_the_vocabulary_are_refused_when_loading(tmp_path, merges,
                                                                          says):
    """A merge must join two tokens of encoder.json into a third (as Hugging Face's tokenizers
    also require): the original crashed with a KeyError on the first text that reached such a
    merge, and a merge of unknown symbols was silently accepted."""
    encoder = _byte_vocab()
    encoder["ab"] = len(encoder)
    d = write_bpe(tmp_path / "v", encoder, merges)
    with pytest.raises(UserError, match=re.escape(says) + " encoder.json"):
        load_encoder(d)


def test_canonical_vocab_with_extra_tokens_uses_tiktoken(tmp_path):
    encoder = _byte_vocab()
    merges = [("a", "b"), ("ab", "c"), ("Ġ", "abc")]
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<pad>"] = len(encoder)  # never produced by BPE, by either algorithm
    d = write_bpe(tmp_path / "v", encoder, merges)
    enc, ref = load_encoder(d), ReferenceBPE(d)
    assert enc.backend == "tiktoken" and enc.eot_token is None
    for text in ["abc abc", "abcabc <pad>", EOT]:
        assert enc.encode(text) == enc.encode_ordinary(text) == ref.encode(text)
    assert enc.decode([encoder["<pad>"]]) == "<pad>"


def test_merges_without_header_or_trailing_newline(tmp_path, small_vocab, prose):
    body = (small_vocab / "vocab.bpe").read_text(encoding="utf-8").split("\n", 1)[1]
    d = tmp_path / "v"
    d.mkdir()
    (d / "encoder.json").write_bytes((small_vocab / "encoder.json").read_bytes())
    (d / "vocab.bpe").write_text(body.rstrip("\n").replace("\n", "\r\n"), encoding="utf-8")
    assert load_encoder(d).encode(prose[:20000]) == load_encoder(small_vocab).encode(prose[:20000])


# ----------------------------------------------------------------------------- sentencepiece

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, prose) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prose.split("\n")[:4000]), model_prefix=str(d / "sp"),
        vocab_size=400, model_type="bpe", user_defined_symbols=[EOT], minloglevel=2,
        byte_fallback=True, character_coverage=0.99)
    return d


def test_sentencepiece_dir(sp_dir, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "sp.model"))
    enc = load_encoder(sp_dir)
    assert enc.backend == "sentencepiece" and enc.n_vocab == 400
    assert enc.eot_token == sp.piece_to_id(EOT) != sp.unk_id()
    text = "Hello world, the quick brown fox. Ünïcödé 😀"
    assert enc.encode_ordinary(text) == sp.encode(text)
    assert enc.decode(enc.encode(text)) == text  # byte_fallback covers the rare characters
    assert enc.encode("ab" + EOT + "cd") == sp.encode("ab") + [enc.eot_token] + sp.encode("cd")
    assert enc.encode_ordinary_batch(["ab", "cd"], num_threads=2) == [sp.encode("ab"),
                                                                      sp.encode("cd")]
    assert enc.encode_batch(["a" + EOT]) == [enc.encode("a" + EOT)]
    # encode_ordinary keeps the literal as text (its bytes), where sentencepiece itself would
    # match the user-defined piece: a chat message cannot end its turn with it
    ordinary = enc.encode_ordinary("ab" + EOT + "cd")
    assert enc.eot_token not in ordinary and sp.encode("ab" + EOT + "cd") != ordinary
    assert enc.decode(ordinary) == "ab" + EOT + "cd"
    literal = [sp.piece_to_id(f"<0x{b:02X}>") for b in EOT.encode()]
    assert any(ordinary[i:i + len(literal)] == literal for i in range(len(ordinary)))
    assert pickle.loads(pickle.dumps(enc)).encode(text) == enc.encode(text)
    # Copying replaces stale BPE files, which load_encoder would otherwise prefer.
    out = tmp_path / "out"
    write_bpe(out, _byte_vocab(), [])
    assert [p.name for p in copy_encoder_files(sp_dir, out)] == ["sp.model"]
    assert sorted(p.name for p in out.iterdir()) == ["sp.model"]
    assert load_encoder(out).encode(text) == enc.encode(text)
    assert encoder_fingerprint(out) == enc.fingerprint


def test_sentencepiece_without_eot_piece_uses_eos(tmp_path, prose):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prose.split("\n")[:2000]), model_prefix=str(tmp_path / "sp"),
        vocab_size=200, minloglevel=2)
    enc = load_encoder(tmp_path)
    assert enc.eot_token == spm.SentencePieceProcessor(
        model_file=str(tmp_path / "sp.model")).eos_id()
    assert enc.encode("a" + EOT + "b")[len(enc.encode("a"))] == enc.eot_token


# ----------------------------------------------------------------------------- bad input

def _vocab_dir(tmp_path: Path, encoder_text: str, merges_text: str) -> Path:
    (tmp_path / "encoder.json").write_text(encoder_text, encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(merges_text, encoding="utf-8")
    return tmp_path


GOOD_ENCODER = json.dumps({**_byte_vocab(), "ab": 256})


@pytest.mark.parametrize("encoder_text, merges_text, message", [
    ("{not json", "#version: 0.2\na b\n", r"encoder\.json: not valid JSON"),
    ("[1, 2]", "#version: 0.2\na b\n", r"encoder\.json: expected a non-empty JSON object"),
    ("{}", "#version: 0.2\na b\n", r"encoder\.json: expected a non-empty JSON object"),
    ('{"a": "0"}', "", r"encoder\.json: the id of 'a' is '0', not an integer"),
    ('{"a": 0, "b": 2}', "", r"encoder\.json: id 2 \('b'\) is outside 0\.\.1"),
    ('{"a": 0, "b": 0}', "", r"encoder\.json: id 0 \('b'\) is used twice"),
    (GOOD_ENCODER, "#version: 0.2\na b\nabc\n", r"vocab\.bpe: line 3: expected two tokens"),
    (GOOD_ENCODER, "#version: 0.2\na b c\n", r"vocab\.bpe: line 2: expected two tokens"),
    (GOOD_ENCODER, "#version: 0.2\na b\nx \u4e2d\n", r"vocab\.bpe: line 3: .*byte alphabet"),
    (GOOD_ENCODER, "#version: 0.2\na\tb\n\u2581a b\n", r"vocab\.bpe: line 3: .*byte alphabet"),
])
def test_malformed_files_name_the_file(tmp_path, encoder_text, merges_text, message):
    d = _vocab_dir(tmp_path, encoder_text, merges_text)
    with pytest.raises(UserError, match=message):
        load_encoder(d)


def test_invalid_utf8_and_missing_files(tmp_path):
    (tmp_path / "encoder.json").write_bytes(b'{"\xff": 0}')
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match=r"encoder\.json: not UTF-8"):
        load_encoder(tmp_path)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(UserError, match="has encoder.json but not vocab.bpe"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        load_encoder(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "sp.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"sp\.model: not a valid sentencepiece model"):
        load_encoder(tmp_path)


def test_user_errors_reach_the_cli_as_one_line(tmp_path, capsys):
    from gpt2.cli import run

    d = _vocab_dir(tmp_path, "{oops", "")
    assert run(lambda argv: load_encoder(d)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "encoder.json" in err and err.count("\n") == 1

"""gpt2 tokenizer train: OpenAI-format files whose ids equal Hugging Face's on the corpus."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import gpt2_vocab
from gpt2.commands import tokenizer as T_cmd
from gpt2.tokenizer import train as T
from gpt2.errors import UserError

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n" * 10,
    "def encode(text):\n    return [ord(c) for c in text]  # 12345 67890\n" * 15,
    "Ünïcödé, 漢字, テキスト and émojis 🙂🙂 survive byte-level BPE.\n" * 8,
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TEXT):
        (root / f"{i}.txt").write_text(t)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return T.train_tokenizer(corpus, 400, tmp_path_factory.mktemp("tok"), quiet=True)


def hf_reference(corpus, vocab_size):
    # Trained here independently, with the settings the module promises, on whole files
    # (Tokenizer.train(files) would cut them into lines, which GPT-2's pre-tokenizer never does).
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer=trainer)
    return tok


def test_files_in_openai_format(trained):
    encoder = json.loads((trained / "encoder.json").read_text())
    lines = (trained / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = [tuple(line.split(" ")) for line in lines[1:-1]]
    assert len(encoder) == 400 == 256 + len(merges) + 1
    # The first 256 ids are the bytes in GPT-2's order (same table as GPT-2's own files).
    b2u = gpt2_vocab._bytes_to_unicode()
    gpt2_encoder = json.loads((gpt2_vocab.vocab_dir() / "encoder.json").read_text())
    first = sorted(encoder, key=encoder.get)[:256]
    assert first == sorted(gpt2_encoder, key=gpt2_encoder.get)[:256]
    assert set(first) == set(b2u.values())
    # Then merge i builds token 256 + i; <|endoftext|> is last.
    assert all(encoder[a + b] == 256 + i for i, (a, b) in enumerate(merges))
    assert encoder["<|endoftext|>"] == 399
    hparams = json.loads((trained / "hparams.json").read_text())
    assert hparams == {"n_vocab": 400, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def test_load_encoder_matches_huggingface(trained, corpus):
    from gpt2.tokenizer import load_encoder

    enc = load_encoder(trained)
    hf = hf_reference(corpus, 400)
    encoder = json.loads((trained / "encoder.json").read_text())
    merges = (trained / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    assert [m.split(" ") for m in merges] == json.loads(hf.to_str())["model"]["merges"]
    assert enc.n_vocab == 400 and enc.eot_token == 399
    for text in TEXT + ["unseen words: zebra quartz 999, ÆØÅ\n\n  indented"]:
        ids = enc.encode_ordinary(text)
        # Same pieces as Hugging Face; the numbering is ours (GPT-2's byte order).
        assert ids == [encoder[t] for t in hf.encode(text).tokens]
        assert enc.decode(ids) == text
    assert enc.encode("a<|endoftext|>b")[1] == 399


def test_cli_overrides_and_errors(corpus, tmp_path):
    out = tmp_path / "tok"
    assert T_cmd.main(["train", str(corpus / "*.txt"), "--vocab_size", "300", "--out", str(out),
                   "--n_ctx", "256", "--n_embd", "64", "--n_head", "4", "--n_layer", "2",
                   "--quiet"]) == 0
    assert json.loads((out / "hparams.json").read_text()) == {
        "n_vocab": 300, "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2}
    with pytest.raises(UserError, match="at least 257"):
        T_cmd.main(["train", str(corpus), "--vocab_size", "100", "--out", str(out)])
    with pytest.raises(UserError, match="matches no files"):
        T_cmd.main(["train", str(tmp_path / "none*"), "--vocab_size", "300", "--out", str(out)])


def test_cli_dispatch_and_model_config(corpus, tmp_path):
    from gpt2.cli import main
    from gpt2.model import GPTConfig

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab_size", "270", "--out", str(out),
                 "--quiet"]) == 0
    config = GPTConfig(**json.loads((out / "hparams.json").read_text()))
    assert config.n_vocab == 270

"""GGUF export, read back by llama.cpp's own gguf-py (GGUFReader) and run by llama.cpp itself
(llama-cpp-python; the tests that need it build it from PyPI's source distribution once, which
takes ~25 min on 2 cores, so they are ``slow``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_model

from gpt2.io.gguf_file import gguf_name
from gpt2.io.model_dir import load_model, save_model
from gpt2.io.tensors import weights_of
from gpt2.model import GPTConfig
from gpt2.tokenizer.chat import DEFAULT_TEMPLATE, ChatTemplate

gguf = pytest.importorskip("gguf")

CONFIG = GPTConfig(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_vocab_dir):
    """A small GPT-2 with the real vocabulary and a chat template, saved as our model dir."""
    path = tmp_path_factory.mktemp("m") / "model"
    save_model(make_model(CONFIG), path, encoder_dir=gpt2_vocab_dir)
    ChatTemplate.default().save(path)
    return path


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """The same shape with a byte-level vocabulary (257 ids, no merges): gguf-py reads a file
    of GPT-2's 50,257 tokens and 50,000 merges in seconds, this one at once."""
    from test_train import make_model_dir

    path = make_model_dir(tmp_path_factory.mktemp("small") / "model", n_ctx=128)
    save_model(make_model(GPTConfig(n_vocab=257, n_ctx=128, n_embd=64, n_head=4, n_layer=2)),
               path)
    ChatTemplate.default().save(path)
    return path


def export(model_dir: Path, out: Path, *flags: str) -> int:
    """``gpt2 export`` in this process (as the CLI runs it: errors are one line, exit 1)."""
    from gpt2.cli import main

    return main(["export", str(model_dir), str(out), "--format", "gguf", *flags])


def fields(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = f.contents()
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_every_tensor_and_llama_cpp_keys(model_dir, small_model_dir,
                                                              tmp_path, outtype):
    """f32 with GPT-2's real vocabulary; f16 and q8_0 (what changes is the tensors) with the
    byte-level one."""
    if outtype != "f32":
        model_dir = small_model_dir
    out = tmp_path / "m.gguf"
    assert export(model_dir, out, "--outtype", outtype) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    reader = gguf.GGUFReader(out)
    kv = fields(reader)
    assert kv["general.architecture"] == "gpt2" and kv["general.name"] == "m"
    assert kv["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert (kv["gpt2.block_count"], kv["gpt2.context_length"], kv["gpt2.embedding_length"],
            kv["gpt2.feed_forward_length"], kv["gpt2.attention.head_count"]) == (2, 128, 64, 256, 4)
    if outtype != "f32":
        assert len(kv["tokenizer.ggml.tokens"]) == 257
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    vocab = json.loads((model_dir / "encoder.json").read_text())
    eot = vocab["<|endoftext|>"]
    tokens = kv["tokenizer.ggml.tokens"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    types = kv["tokenizer.ggml.token_type"]
    assert types[eot] == gguf.TokenType.CONTROL and set(types[:eot]) == {gguf.TokenType.NORMAL}
    merges = [m for m in (model_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
              if m]
    assert kv["tokenizer.ggml.merges"] == (merges or ["a 1"])  # (none: one that never applies)
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == eot
    assert "{% generation %}" not in kv["tokenizer.chat_template"]
    assert kv["tokenizer.chat_template"] == DEFAULT_TEMPLATE.replace(
        "{% generation %}", "").replace("{% endgeneration %}", "")

    ours = weights_of(load_model(model_dir))
    read = {t.name: t for t in reader.tensors}
    assert set(read) == {gguf_name(n) for n in ours}  # tied head: no output.weight
    Q = gguf.GGMLQuantizationType
    for name, t in ours.items():
        g = read[gguf_name(name)]
        want = t.numpy()
        got = gguf.quants.dequantize(g.data, g.tensor_type).reshape(want.shape)
        if want.ndim == 1 or name == "wpe.weight" or outtype == "f32":
            assert g.tensor_type == Q.F32 and np.array_equal(got, want), name
        elif outtype == "f16":
            assert g.tensor_type == Q.F16, name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # Q8_0: blocks of 32, max |x| -> 127, scale d in f16: error <= d / 2 plus the
            assert g.tensor_type == Q.Q8_0, name  # scale's rounding (2^-11 d) times 127
            d = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(got - want).reshape(-1, 32)
            assert (err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7).all(), name
            assert (err > 0).any(), name  # really quantized


def test_gguf_refuses_an_existing_file_and_flags_of_other_formats(small_model_dir, tmp_path,
                                                                 capsys):
    model_dir = small_model_dir
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert export(model_dir, out) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out}: exists; pass --force to replace it"]
    assert out.read_bytes() == b"keep me"
    assert export(model_dir, out, "--force") == 0
    assert gguf.GGUFReader(out).tensors
    from gpt2.cli import main

    assert main(["export", str(model_dir), str(tmp_path / "x"), "--outtype", "q8_0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --outtype: only for --format gguf, not " \
                                               "huggingface"
    assert not (tmp_path / "x").exists()


def test_gguf_refuses_a_sentencepiece_tokenizer(tmp_path, capsys):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"word{i} and some text {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=100, minloglevel=2)
    d = tmp_path / "spdir"
    d.mkdir()
    os.replace(tmp_path / "sp.model", d / "sp.model")
    save_model(make_model(GPTConfig(n_vocab=100, n_ctx=16, n_embd=32, n_head=4, n_layer=1)), d)
    assert export(d, tmp_path / "sp.gguf") == 1
    err = capsys.readouterr().err
    assert "byte-level BPE" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sp.gguf").exists() and not list(tmp_path.glob(".sp.gguf*"))


def test_gguf_from_a_hugging_face_directory_equals_from_ours(small_model_dir, tmp_path):
    """Any model directory every other command reads: the HF export of the same model gives
    the same GGUF tensors, tokenizer and template."""
    from gpt2.cli import main

    model_dir = small_model_dir
    assert main(["export", str(model_dir), str(tmp_path / "hf")]) == 0
    assert export(model_dir, tmp_path / "ours.gguf") == 0
    assert export(tmp_path / "hf", tmp_path / "hf.gguf") == 0
    ours, theirs = (gguf.GGUFReader(tmp_path / f"{n}.gguf") for n in ("ours", "hf"))
    for name, t in ((t.name, t) for t in ours.tensors):
        other = next(x for x in theirs.tensors if x.name == name)
        assert np.array_equal(t.data, other.data), name
    a, b = fields(ours), fields(theirs)
    assert a.pop("general.name") == "ours" and b.pop("general.name") == "hf"
    a.pop("general.description"), b.pop("general.description")
    assert a == b

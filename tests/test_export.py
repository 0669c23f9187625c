"""Export: transformers loads our Hugging Face directories with the same logits and token ids;
the release layout matches what TensorFlow wrote and loads back unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.io.model_dir import load_model, save_model
from gpt2.cli import run
from gpt2.tokenizer import load_encoder
from gpt2.commands.export import main
from gpt2.io.hf import export_huggingface
from gpt2.io.release import export_release, release_name
from gpt2.model import GPTConfig
from gpt2.files.tf_checkpoint import read_tf_checkpoint
from helpers import make_model

transformers = pytest.importorskip("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "release-tiny"
PROSE = ("The quick brown fox jumps over the lazy dog. It's 3:14 p.m. -- naïve café owners "
         "can't stop  double  spaces,\n\ttabs and emoji 🙂 from appearing in 1,234,567 documents!"
         "<|endoftext|>A second document starts here.")
HF_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "chat_template.jinja"}


def hf_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return hf(x).logits


def test_huggingface_export_gives_the_same_logits(tiny_config, tmp_path):
    model = make_model(tiny_config)
    export_huggingface(model, tmp_path / "hf")
    x = torch.randint(0, tiny_config.n_vocab, (2, tiny_config.n_ctx))
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", x), ours, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    # Import is load_model: the exported directory reads back to the same weights.
    back = load_model(tmp_path / "hf")
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_safetensors_use_transformers_names_and_conv1d_orientation(tiny_config, tmp_path):
    from safetensors.torch import load_file

    model = make_model(tiny_config)
    export_huggingface(model, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_head=4, n_layer=2)).state_dict()
    expected = {k for k in reference if k != "lm_head.weight"
                and not re.fullmatch(r"transformer\.h\.\d+\.attn\.(masked_)?bias", k)}
    assert set(tensors) == expected
    for k in tensors:
        assert tensors[k].shape == reference[k].shape, k
    E = tiny_config.n_embd
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (E, 3 * E)  # [in, out]
    assert torch.equal(tensors["transformer.h.1.mlp.c_proj.weight"],
                       model.h[1].mlp.c_proj.weight.t())


def test_tokenizer_export_gives_the_same_ids(gpt2_vocab_dir, tmp_path):
    config = GPTConfig(n_vocab=50257, n_ctx=64, n_embd=16, n_head=2, n_layer=1)
    save_model(make_model(config), tmp_path / "ours", encoder_dir=gpt2_vocab_dir)
    assert main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} == HF_FILES
    # The same vocabulary and merges under transformers' names.
    assert json.loads((tmp_path / "hf" / "vocab.json").read_text()) == \
        json.loads((gpt2_vocab_dir / "encoder.json").read_text())
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == \
        (gpt2_vocab_dir / "vocab.bpe").read_bytes()

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = load_encoder(tmp_path / "ours")
    assert len(tok) == 50257
    for text in (PROSE, "hello world", " leading space and trailing ", PROSE * 3):
        ids = tok(text)["input_ids"]
        assert ids == enc.encode(text)
        assert tok.decode(ids) == enc.decode(ids)
    assert tok("hello world")["input_ids"] == [31373, 995]
    assert tok.eos_token_id == tok.bos_token_id == 50256
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 50256

    x = torch.tensor([enc.encode(PROSE)[:64]])
    with torch.no_grad():
        ours = load_model(tmp_path / "ours")(x)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", x), ours, atol=1e-5, rtol=0)


def test_release_export_reproduces_what_tensorflow_wrote(tmp_path):
    export_release(load_model(FIXTURE), tmp_path / "tf", encoder_dir=FIXTURE)
    written, original = read_tf_checkpoint(tmp_path / "tf", verify=True), read_tf_checkpoint(FIXTURE)
    assert list(written) == list(original)  # names, in TensorFlow's sorted order
    for name, array in original.items():
        assert written[name].dtype == np.float32 and written[name].shape == array.shape, name
        assert np.array_equal(written[name], array), name
    assert {p.name for p in (tmp_path / "tf").iterdir()} == {
        "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "hparams.json",
        "encoder.json", "vocab.bpe"}
    assert json.loads((tmp_path / "tf" / "hparams.json").read_text()) == \
        json.loads((FIXTURE / "hparams.json").read_text())
    assert 'model_checkpoint_path: "model.ckpt"' in (tmp_path / "tf" / "checkpoint").read_text()
    expected = np.load(FIXTURE / "expected_logits.npz")
    with torch.no_grad():
        logits = load_model(tmp_path / "tf")(torch.from_numpy(expected["tokens"]).long())
    np.testing.assert_allclose(logits.numpy(), expected["logits"], atol=1e-5, rtol=0)


def test_release_export_round_trips_a_trained_model(tiny_config, tmp_path, capsys):
    model = make_model(tiny_config, seed=3)
    save_model(model, tmp_path / "ours")
    assert main([str(tmp_path / "ours"), str(tmp_path / "tf"), "--format", "release"]) == 0
    assert ".meta" in capsys.readouterr().out  # says what is missing and why
    back = load_model(tmp_path / "tf")
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    names = read_tf_checkpoint(tmp_path / "tf")
    E = tiny_config.n_embd
    assert names["model/h0/mlp/c_fc/w"].shape == (1, E, 4 * E)
    assert names["model/h1/ln_2/g"].shape == (E,)
    assert len(names) == 4 + 12 * tiny_config.n_layer


def test_release_names_invert_the_loader_table():
    assert release_name("wte.weight", 2) == ("model/wte", False)
    assert release_name("h.11.attn.c_attn.weight", 2) == ("model/h11/attn/c_attn/w", True)
    assert release_name("h.0.ln_1.weight", 1) == ("model/h0/ln_1/g", False)
    assert release_name("ln_f.bias", 1) == ("model/ln_f/b", False)


def test_output_directory_is_never_half_written(tiny_config, tmp_path, capsys):
    save_model(make_model(tiny_config), tmp_path / "ours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(main, [str(tmp_path / "ours"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([str(tmp_path / "ours"), str(out), "--force"]) == 0
    assert "keep.txt" not in {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert run(main, [str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err

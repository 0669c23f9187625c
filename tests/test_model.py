"""The model is GPT-2 to the last logit: parity with transformers, KV cache, model directories."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import gpt2
from gpt2.io.model_dir import load_model, save_model
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from helpers import lm_loss

CONFIGS = [
    GPTConfig(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=2),
    GPTConfig(n_vocab=211, n_ctx=64, n_embd=48, n_head=3, n_layer=3),
    GPTConfig(n_vocab=50, n_ctx=16, n_embd=16, n_head=1, n_layer=1),
]


def hf_model(config: GPTConfig, seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random LN and bias values too, so no parameter is trivially 0 or 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}E{c.n_embd}H{c.n_head}")
def test_logits_and_loss_match_transformers(config, tmp_path):
    hf = hf_model(config, seed=config.n_embd)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    ours = load_model(tmp_path)
    tokens = torch.randint(0, config.n_vocab, (3, config.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens, labels=tokens)
        logits = ours(tokens)
    assert logits.shape == (3, config.n_ctx, config.n_vocab)
    assert (logits - expected.logits).abs().max().item() <= 1e-5
    assert abs(lm_loss(logits, tokens).item() - expected.loss.item()) <= 1e-5


def test_save_and_load_round_trip(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["hparams.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "hparams.json").read_text()) == {
        "n_vocab": 97, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
    loaded = gpt2.load_model(tmp_path / "m")
    assert not loaded.training and loaded.lm_head.weight is loaded.wte.weight
    tokens = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    # saving from inside compile / data-parallel wrappers writes the plain names
    for i, wrapped in enumerate([torch.compile(model), torch.nn.DataParallel(model)]):
        save_model(wrapped, tmp_path / f"w{i}")
        assert gpt2.load_model(tmp_path / f"w{i}").state_dict().keys() == loaded.state_dict().keys()


def test_dtype_and_device(tiny_config, tmp_path):
    save_model(GPT(tiny_config), tmp_path)
    assert gpt2.load_model(tmp_path).wte.weight.dtype == torch.float32
    assert gpt2.load_model(tmp_path, dtype="bf16").wte.weight.dtype == torch.bfloat16
    assert gpt2.load_model(tmp_path, device="cpu", dtype=torch.float16).ln_f.bias.dtype == torch.float16


def test_a_meta_model_skips_initial_values_in_its_own_thread_only(tiny_config, monkeypatch):
    """meta_model builds without computing initial values; a model another thread builds
    meanwhile is initialised as usual, and so is one built afterwards."""
    import threading

    import gpt2.io.model_dir as model_dir

    inside, done, seen = threading.Event(), threading.Event(), {}
    real = model_dir.GPT

    def held(config):  # the meta model's thread waits inside, in the middle of its build
        inside.set()
        assert done.wait(30)
        return real(config)

    def other():
        assert inside.wait(30)
        seen["other"] = torch.nn.init.ones_(torch.zeros(3)).tolist()
        done.set()

    monkeypatch.setattr(model_dir, "GPT", held)
    thread = threading.Thread(target=other)
    thread.start()
    with model_dir._uninitialized():
        seen["inside"] = torch.nn.init.ones_(torch.zeros(3)).tolist()
        model = model_dir.meta_model(tiny_config)
    thread.join(30)
    assert seen == {"inside": [0.0, 0.0, 0.0], "other": [1.0, 1.0, 1.0]}
    assert model.wte.weight.is_meta
    assert torch.nn.init.ones_(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    torch.manual_seed(0)
    a = GPT(tiny_config).wte.weight
    torch.manual_seed(0)
    assert a.std() > 0 and torch.equal(a, GPT(tiny_config).wte.weight)


@pytest.mark.parametrize("split", [1, 5, 31])
def test_kv_cache_equals_full_recompute(tiny_config, split):
    torch.manual_seed(1)
    model = GPT(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.n_vocab, (2, tiny_config.n_ctx))
    with torch.no_grad():
        full = model(tokens)
        # a prefix, then the rest in steps of one and of several tokens
        logits, past = model(tokens[:, :split], use_cache=True)
        pieces = [logits]
        t = split
        while t < tokens.size(1):
            step = 1 if t % 2 else 3
            logits, past = model(tokens[:, t:t + step], past=past, use_cache=True)
            pieces.append(logits)
            t += step
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5
    assert past[0][0].shape == (2, tiny_config.n_head, tiny_config.n_ctx, tiny_config.head_dim)


def test_parameter_count_of_124M():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808


def test_too_long_input_is_an_error(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, tiny_config.n_ctx + 1, dtype=torch.long))
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="positions do not apply"):  # (segments set them)
        model(tokens, segments=torch.zeros_like(tokens), positions=torch.arange(4)[None])


@pytest.mark.parametrize("bad", [
    {"n_vocab": 0}, {"n_head": 5}, {"n_layer": "2"}, {"n_ctx": 1.5}, {"dropout": 1.0},
])
def test_invalid_config(bad):
    values = {"n_vocab": 97, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2, **bad}
    with pytest.raises(ValueError):
        GPTConfig.from_dict(values)


# --- bad model directories: one-line UserError naming the file -------------------------------

def saved(tmp_path, config):
    save_model(GPT(config), tmp_path)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_released_model_hints_download(tmp_path):
    with pytest.raises(UserError, match="download_model.py 124M"):
        gpt2.resolve_model_dir("124M", models_dir=tmp_path)


def test_aliases(tmp_path):
    (tmp_path / "124M").mkdir()
    assert gpt2.resolve_model_dir("117M", models_dir=tmp_path) == tmp_path / "124M"
    (tmp_path / "345M").mkdir()
    assert gpt2.resolve_model_dir("355M", models_dir=tmp_path) == tmp_path / "345M"


def test_malformed_hparams(tiny_config, tmp_path):
    d = saved(tmp_path, tiny_config)
    (d / "hparams.json").write_text("{not json")
    with pytest.raises(UserError, match="hparams.json: invalid JSON"):
        load_model(d)
    (d / "hparams.json").write_text(json.dumps({"n_vocab": 97, "n_embd": 30, "n_head": 4}))
    with pytest.raises(UserError, match="hparams.json: n_embd"):
        load_model(d)


def test_shape_mismatch(tiny_config, tmp_path):
    d = saved(tmp_path, tiny_config)
    (d / "hparams.json").write_text(json.dumps({**tiny_config.to_dict(), "n_vocab": 98}))
    with pytest.raises(UserError, match=r"wte.weight has shape \[97, 32\], but the hparams imply \[98, 32\]"):
        load_model(d)


def test_missing_layer(tiny_config, tmp_path):
    d = saved(tmp_path, tiny_config)
    (d / "hparams.json").write_text(json.dumps({**tiny_config.to_dict(), "n_layer": 3}))
    with pytest.raises(UserError, match="the weights hold 2 layers but the hparams say n_layer 3"):
        load_model(d)


def test_truncated_weights(tiny_config, tmp_path):
    d = saved(tmp_path, tiny_config)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors: cannot read"):
        load_model(d)


def test_pickles_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="refusing to load a pickled file"):
        load_model(tmp_path)


def test_untied_hf_head_is_refused(tmp_path):
    hf = hf_model(GPTConfig(n_vocab=50, n_ctx=16, n_embd=16, n_head=1, n_layer=1), seed=0)
    hf.config.tie_word_embeddings = False
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = torch.randn(50, 16)
    save_file(state, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(UserError, match="lm_head.weight differs"):
        load_model(tmp_path)

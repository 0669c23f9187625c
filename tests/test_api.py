"""The public API holds: every name ``gpt2`` exports works, called as README shows, after every
module of the package has been imported (``import gpt2.train.config`` used to turn
``gpt2.train`` into a module, and ``import gpt2.evaluate`` ``gpt2.evaluate``)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import warnings

import torch

import gpt2
from test_download import server  # noqa: F401 (the fixture: a release on 127.0.0.1)
from test_train import make_model_dir, synthetic_text


def test_every_public_name_works_after_importing_every_module(tmp_path, gpt2_vocab_dir,
                                                              server, monkeypatch):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (the renamed modules' aliases)
        for module in pkgutil.walk_packages(gpt2.__path__, "gpt2."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
        importlib.import_module("gpt2.evaluate")
        importlib.import_module("gpt2.train.config")
    assert all(callable(getattr(gpt2, name)) for name in gpt2.__all__)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))

    # models: build, save, read back in every layout, export, download
    config = gpt2.GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    model = gpt2.GPT(config).eval()
    saved = gpt2.save_model(model, tmp_path / "models" / "124M", encoder_dir=gpt2_vocab_dir)
    assert gpt2.load_config(saved) == config
    assert gpt2.resolve_model_dir("124M", "models").resolve() == saved.resolve()
    loaded = gpt2.load_model("models/124M")
    tokens = torch.tensor([[464, 3290, 318]])
    assert torch.equal(loaded(tokens), model(tokens))
    hf = gpt2.export_huggingface(model, tmp_path / "hf", encoder_dir=saved)
    release = gpt2.export_release(model, tmp_path / "tf", encoder_dir=saved)
    assert torch.allclose(gpt2.load_model(hf)(tokens), gpt2.load_model(release)(tokens),
                          atol=1e-6)
    for path in release.iterdir():
        server.files[f"/models/124M/{path.name}"] = path.read_bytes()
    server.files["/models/124M/model.ckpt.meta"] = b"(no graph)"
    fetched = gpt2.download_model("124M", tmp_path / "fetched", base_url=server.url)
    assert torch.allclose(gpt2.load_model(fetched)(tokens), model(tokens), atol=1e-6)

    # tokenizers
    enc = gpt2.get_encoder("124M", models_dir="models")
    assert enc.encode("hello world") == [31373, 995]
    assert gpt2.load_encoder(saved).decode([31373, 995]) == "hello world"
    vocab = json.loads((gpt2_vocab_dir / "encoder.json").read_text())
    assert gpt2.Encoder(vocab, []).encode("hi") == [vocab["h"], vocab["i"]]

    # sampling
    out = gpt2.sample_sequence(model, length=4, context=tokens, top_k=40, seed=0)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], tokens)
    texts = gpt2.generate_batch(model, enc, tokens[0].tolist(), n=2, length=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    # data, training, evaluation
    (tmp_path / "text.txt").write_text(synthetic_text(400))
    chunks = gpt2.load_dataset("text.txt", enc)
    assert gpt2.Sampler(chunks, seed=0).sample_batch(2, 16).shape == (2, 16)
    tiny = make_model_dir(tmp_path / "tiny")
    cfg = gpt2.TrainConfig(dataset="text.txt", model_dir=str(tiny), init="fresh", max_steps=2,
                           sample_every=0, save_every=0)
    assert gpt2.train(cfg) == 0
    result = gpt2.evaluate(model, chunks)
    assert result["tokens"] > 0 and result["perplexity"] > 1

    # errors
    try:
        raise gpt2.UserError("bad input")
    except gpt2.UserError as e:
        assert str(e) == "bad input"

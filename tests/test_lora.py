"""LoRA adapters: unchanged model at start, only adapters train, merge = base + B A * alpha/r."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from gpt2.io.model_dir import load_model, save_model
from gpt2.cli import run
from gpt2.errors import UserError
from gpt2.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, count_trainable,
                       load_lora, load_lora_model, lora_state_dict, merge_lora, merged_model,
                       save_lora)
from gpt2.commands.lora import main
from gpt2.model import GPT
from helpers import lm_loss


def make_model(config, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():  # biases and layer norms away from 0 / 1, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tokens(config, batch=3, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.n_vocab, (batch, config.n_ctx), generator=g)


def train_steps(model, config, steps=5):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x = tokens(config, seed=10 + i)
        loss = lm_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_fresh_adapters_leave_the_model_unchanged_and_freeze_the_rest(tiny_config):
    base = make_model(tiny_config)
    x = tokens(tiny_config)
    with torch.no_grad():
        before = base(x)
    model = apply_lora(base, rank=4, alpha=8, targets=("c_attn",))
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)  # B = 0: the update is exactly zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"h.{i}.attn.c_attn.lora_{m}" for i in range(tiny_config.n_layer)
                         for m in "AB"}
    layer = model.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.shape == (4, tiny_config.n_embd)
    assert layer.lora_B.shape == (3 * tiny_config.n_embd, 4)
    assert layer.lora_A.abs().sum() > 0 and layer.scaling == 2.0
    n_train, n_total = count_trainable(model)
    assert n_train == tiny_config.n_layer * 4 * (tiny_config.n_embd + 3 * tiny_config.n_embd)
    assert n_total > n_train


def test_only_adapter_parameters_change_during_training(tiny_config):
    model = apply_lora(make_model(tiny_config), rank=2, alpha=4, targets=("c_attn", "c_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_config)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = set(lora_state_dict(model))
    assert changed == adapters
    # c_proj selects both the attention and the MLP projection of every block.
    assert {n.rsplit(".", 1)[0] for n in adapters} == {
        f"h.{i}.{m}" for i in range(tiny_config.n_layer)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}


def test_merged_model_equals_base_plus_scaled_low_rank_update(tiny_config):
    base_state = {k: v.clone() for k, v in make_model(tiny_config).state_dict().items()}
    model = train_steps(apply_lora(make_model(tiny_config), rank=3, alpha=5,
                                   targets=("c_attn", "mlp.c_fc")), tiny_config)
    x = tokens(tiny_config, seed=7)
    with torch.no_grad():
        adapted = model(x)
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    merged = merge_lora(model)
    assert type(merged) is GPT
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(GPT(tiny_config).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
    # The folded weights, by hand: W + (alpha / rank) * B @ A; everything else untouched.
    state = merged.state_dict()
    for name, value in base_state.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A" in adapters:
            a, b = adapters[f"{prefix}.lora_A"], adapters[f"{prefix}.lora_B"]
            torch.testing.assert_close(state[name], value + 5 / 3 * b @ a, atol=1e-6, rtol=0)
        else:
            assert torch.equal(state[name], value), name


def test_merged_model_is_a_plain_copy_that_leaves_the_adapters_alone(tiny_config, tmp_path):
    model = train_steps(apply_lora(make_model(tiny_config), rank=2, alpha=4,
                                   targets=("c_attn", "c_fc")), tiny_config)
    x = tokens(tiny_config, seed=5)
    plain = merged_model(model)
    assert type(plain) is GPT and plain.lm_head.weight is plain.wte.weight
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert isinstance(model.h[0].attn.c_attn, LoRALinear)  # the original is untouched
    assert plain.wpe.weight.data_ptr() == model.wpe.weight.data_ptr()  # unadapted: shared
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    save_model(plain, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(x), model(x), atol=1e-5, rtol=0)


def test_save_and_load_round_trip_and_adapter_is_small(tiny_config, tmp_path):
    model = train_steps(apply_lora(make_model(tiny_config), rank=2, alpha=2), tiny_config)
    save_lora(model, tmp_path / "adapter", base_model="models/tiny")
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert meta["rank"] == 2 and meta["alpha"] == 2 and meta["base_model"] == "models/tiny"
    assert meta["targets"] == [f"h.{i}.attn.c_attn" for i in range(tiny_config.n_layer)]
    assert meta["base_config"] == tiny_config.to_dict()
    save_model(make_model(tiny_config), tmp_path / "base")
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < (tmp_path / "base" / "model.safetensors").stat().st_size / 5

    loaded = load_lora(make_model(tiny_config), tmp_path / "adapter")
    x = tokens(tiny_config, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_lora_merge_command_writes_a_plain_model(tiny_config, tmp_path, capsys):
    save_model(make_model(tiny_config), tmp_path / "base")
    model = train_steps(apply_lora(load_model(tmp_path / "base"), rank=2, alpha=4), tiny_config)
    save_lora(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    again = load_lora_model(tmp_path / "adapter")  # the base named in lora.json + adapter
    x = tokens(tiny_config, seed=4)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                 str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    x = tokens(tiny_config, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)


def test_errors(tiny_config, tmp_path, capsys):
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(make_model(tiny_config), rank=2, alpha=2, targets=("c_atn",))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(make_model(tiny_config), rank=0, alpha=2)
    model = apply_lora(make_model(tiny_config), rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=2)
    save_lora(model, tmp_path / "adapter")
    other = make_model(type(tiny_config)(n_vocab=97, n_ctx=32, n_embd=64, n_head=4, n_layer=2))
    with pytest.raises(UserError, match="n_embd=32"):
        load_lora(other, tmp_path / "adapter")
    # Not an adapter directory: one line on stderr, exit 1.
    save_model(make_model(tiny_config), tmp_path / "base")
    assert run(main, ["merge", str(tmp_path / "base"), str(tmp_path / "base"),
                      str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lora.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_lm_head_and_embeddings_are_never_adapted(tiny_config):
    model = apply_lora(make_model(tiny_config), rank=2, alpha=2, targets=("c_fc",))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert model.lm_head.weight is model.wte.weight and not model.wte.weight.requires_grad

"""The speed and memory paths compute exactly what the plain ones do, and the estimate is honest.

- token_loss, the one loss (both ways: one buffer, chunked), equals torch's own cross-entropy of
  the plain head (value and every gradient), at any chunk size, with -100 targets, summed or
  averaged, fp32 and autocast; and that cross-entropy equals a pure reference (written out by
  hand, one position at a time);
- model(tokens, targets=...) is that loss of the next tokens, and refuses keywords that do not
  apply to a loss;
- the preallocated KV cache gives the same logits as torch.cat growth and full recompute, writes
  into its buffers, and never does so while gradients are recorded;
- the CPU oneDNN linear path (decoding) equals F.linear in float64 within fp32 rounding, and is
  taken exactly when it should be;
- memory_estimate's parameter shapes are GPT's, and its activation count matches what autograd
  actually saves (saved-tensor hooks) for our block.
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from gpt2.training.memory import (GB, OPTIMIZERS, estimate_memory, optimizer_bytes,
                                  param_shapes)
from gpt2 import kernels
from gpt2.kernels import OneDNNLinear, decode_kernels
from gpt2.model import GPT, GPTConfig, empty_kv_cache, next_token_targets, token_loss
from helpers import lm_loss

CHUNKS = [0, 1, 7, 31, 62, 1000]  # 0: the one-buffer way


def reference_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood, one position at a time, in float64."""
    total, count = 0.0, 0
    for b in range(tokens.size(0)):
        for t in range(tokens.size(1) - 1):
            row = logits[b, t].double()
            total += (row.exp().sum().log() - row[tokens[b, t + 1]]).item()
            count += 1
    return total / count


def torch_loss(h, w, targets, reduction="mean"):
    """torch's own cross-entropy of the plain head: what token_loss must equal."""
    return F.cross_entropy(F.linear(h, w).flatten(0, -2).float(), targets.flatten(),
                           ignore_index=-100, reduction=reduction)


def grads_of(model: GPT, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def perturbed(config, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).train()
    with torch.no_grad():  # non-trivial layer norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()  # no dropout: every call sees the same network


@pytest.mark.parametrize("batch", [1, 3])
def test_the_reference_cross_entropy_is_the_next_token_nll(tiny_config, batch):
    torch.manual_seed(0)
    logits = torch.randn(batch, 9, tiny_config.n_vocab) * 3
    tokens = torch.randint(0, tiny_config.n_vocab, (batch, 9))
    assert lm_loss(logits, tokens).item() == pytest.approx(reference_loss(logits, tokens), abs=1e-5)
    assert F.cross_entropy(logits.flatten(0, 1), next_token_targets(tokens).flatten(),
                           ignore_index=-100).item() == pytest.approx(
        reference_loss(logits, tokens), abs=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_model_loss_and_gradients_equal_the_plain_head(tiny_config, chunk):
    """model(tokens, targets=tokens) == cross-entropy of model(tokens)'s logits, every gradient
    too (the tied weight's two gradients summed)."""
    model = perturbed(tiny_config, chunk)
    tokens = torch.randint(0, tiny_config.n_vocab, (3, tiny_config.n_ctx))
    plain, g_plain = grads_of(model, lambda: lm_loss(model(tokens), tokens))
    ours, g_ours = grads_of(model, lambda: model(tokens, targets=tokens, loss_chunk=chunk))
    assert ours == pytest.approx(plain, abs=1e-5)
    assert g_plain.keys() == g_ours.keys()
    for name in g_plain:
        assert (g_plain[name] - g_ours[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_loss_with_unscored_targets(tiny_config, chunk, reduction):
    """-100 targets count nowhere (value, gradient, divisor); a scaled incoming gradient, backward
    twice with retain_graph, no-grad, and only one input needing a gradient."""
    torch.manual_seed(1)
    h = torch.randn(2, 8, tiny_config.n_embd, requires_grad=True)
    w = torch.randn(tiny_config.n_vocab, tiny_config.n_embd, requires_grad=True)
    targets = torch.randint(0, tiny_config.n_vocab, (2, 8))
    targets[0, :5] = -100  # e.g. a prompt not trained on
    targets[1, -1] = -100
    (3.5 * torch_loss(h, w, targets, reduction)).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = 3.5 * token_loss(h, w, targets, chunk=chunk, reduction=reduction)
    assert loss.item() / 3.5 == pytest.approx(torch_loss(h, w, targets, reduction).item(),
                                              rel=1e-6, abs=1e-5)  # (a sum: ~130)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradient must not have been scaled in place
    torch.testing.assert_close(h.grad, 2 * gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, 2 * gw, rtol=1e-5, atol=1e-5)
    assert h.grad[0, :5].abs().max() == 0  # unscored rows get no gradient
    with torch.no_grad():
        assert token_loss(h, w, targets, chunk=chunk, reduction=reduction).item() == \
            pytest.approx(torch_loss(h, w, targets, reduction).item(), rel=1e-6, abs=1e-5)
    h.grad = None
    token_loss(h, w.detach(), targets, chunk=chunk, reduction=reduction).backward()
    torch.testing.assert_close(h.grad, gh / 3.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 16])
def test_loss_under_bf16_autocast_tracks_the_plain_head(tiny_config, chunk):
    model = perturbed(tiny_config, 6)
    tokens = torch.randint(0, tiny_config.n_vocab, (2, tiny_config.n_ctx))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, g_plain = grads_of(model, lambda: lm_loss(model(tokens), tokens))
        ours, g_ours = grads_of(model, lambda: model(tokens, targets=tokens, loss_chunk=chunk))
    assert ours == pytest.approx(plain, abs=2e-2)
    for name in g_plain:  # bf16 rounding differs between the orders of work
        scale = g_plain[name].abs().max().item() + 1e-6
        assert (g_plain[name] - g_ours[name]).abs().max().item() <= 0.05 * scale, name
    assert g_ours["wte.weight"].dtype == torch.float32


@pytest.mark.parametrize("kwargs", [dict(use_cache=True), dict(last_only=True),
                                    dict(past=[]), dict(key_mask=torch.ones(1, 4, dtype=bool))])
def test_a_loss_refuses_what_does_not_apply_to_it(tiny_config, kwargs):
    model = GPT(tiny_config)
    tokens = torch.randint(0, tiny_config.n_vocab, (1, 4))
    with pytest.raises(ValueError, match="do not apply"):
        model(tokens, targets=tokens, **kwargs)
    with pytest.raises(ValueError, match="loss_chunk applies to the loss only"):
        model(tokens, loss_chunk=8)


@pytest.mark.parametrize("prefix", [1, 6])
def test_preallocated_cache_equals_full_recompute(tiny_config, prefix):
    torch.manual_seed(3)
    model = GPT(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.n_vocab, (3, tiny_config.n_ctx))
    with torch.inference_mode():
        full = model(tokens)
        past = empty_kv_cache(tiny_config, batch=3)
        buffer = past[0][0].untyped_storage().data_ptr()
        logits, past = model(tokens[:, :prefix], past=past, use_cache=True)
        pieces, t = [logits], prefix
        while t < tokens.size(1):
            step = 1 if t % 3 else 2
            logits, past = model(tokens[:, t:t + step], past=past, use_cache=True)
            pieces.append(logits)
            t += step
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5
    assert past[0][0].shape == (3, tiny_config.n_head, tiny_config.n_ctx, tiny_config.head_dim)
    assert past[0][0].untyped_storage().data_ptr() == buffer  # grew in place, no copy


def test_full_cache_and_gradients_fall_back_to_copying(tiny_config):
    torch.manual_seed(4)
    model = GPT(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.n_vocab, (1, 8))
    with torch.no_grad():
        past = empty_kv_cache(tiny_config, batch=1, max_len=4)
        _, past = model(tokens[:, :4], past=past, use_cache=True)
        full_buffer = past[0][0].untyped_storage().data_ptr()
        logits, past = model(tokens[:, 4:], past=past, use_cache=True)  # no room left: copies
        assert past[0][0].untyped_storage().data_ptr() != full_buffer
        assert torch.allclose(logits, model(tokens)[:, 4:], atol=1e-5)
    # with gradients on, the buffers are never written (saved tensors stay valid)
    past = empty_kv_cache(tiny_config, batch=1)
    logits, present = model(tokens, past=past, use_cache=True)
    assert present[0][0].untyped_storage().data_ptr() != past[0][0].untyped_storage().data_ptr()
    logits.sum().backward()


def test_hidden_states_without_cache_returns_no_cache(tiny_config):
    model = GPT(tiny_config)
    tokens = torch.randint(0, tiny_config.n_vocab, (1, 5))
    h, present = model.hidden_states(tokens, use_cache=False)
    h2, present2 = model.hidden_states(tokens)
    assert present == [] and len(present2) == tiny_config.n_layer and torch.equal(h, h2)


@pytest.mark.parametrize("shape,bias", [((1, 1, 64), True), ((16, 1, 64), False),
                                        ((4, 16, 64), True), ((2, 200, 64), True)])
def test_cpu_decoding_linear_equals_float64(shape, bias, monkeypatch):
    torch.manual_seed(0)
    layer = OneDNNLinear(64, 1000, bias=bias)
    x = torch.randn(shape)
    if shape[1] > 1:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(),
                                       None if layer.bias is None else layer.bias.double())
    calls = []
    real = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(x)
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    assert (fast.double() - exact).abs().max().item() < 1e-5
    rows = x.numel() // x.size(-1)
    assert bool(calls) == (rows <= kernels.ONEDNN_MAX_ROWS and kernels.onednn_available())
    calls.clear()
    y = layer(x)  # with gradients on: always the ordinary path
    assert not calls and torch.equal(y.detach(), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the fast path is only promised on x86-64")
def test_onednn_path_is_available_on_x86():
    """CI's CPUs (x86-64, the standard torch wheel) must get the fast path, not the fallback."""
    assert kernels.onednn_available()


def test_decode_kernels_are_swapped_in_for_the_block_and_out_after(tiny_config):
    model = GPT(tiny_config).eval()
    plain = {n: type(m) for n, m in model.named_modules()}
    assert torch.nn.Linear in plain.values() and OneDNNLinear not in plain.values()
    tokens = torch.randint(0, tiny_config.n_vocab, (1, 5))
    with torch.no_grad():
        before = model(tokens)
        with decode_kernels(model):
            inside = {n: type(m) for n, m in model.named_modules()}
            swapped = model(tokens)
    assert OneDNNLinear in inside.values() or not kernels.onednn_available()
    assert {n: type(m) for n, m in model.named_modules()} == plain
    assert set(model.state_dict()) == {n for n in GPT(tiny_config).state_dict()}
    torch.testing.assert_close(swapped, before, rtol=0, atol=1e-5)


# --- memory estimate ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [GPTConfig(), GPTConfig(n_vocab=97, n_ctx=32, n_embd=32,
                                                           n_head=4, n_layer=2)])
def test_param_shapes_are_the_models(config):
    with torch.device("meta"):
        model = GPT(config)
    assert param_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def saved_activation_bytes(model: GPT, tokens: torch.Tensor, autocast: bool) -> int:
    """Bytes of distinct storages autograd saves for backward, parameters (and their casts) aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h, _ = model.hidden_states(tokens, use_cache=False)
        model.lm_head(h)  # saves h; the loss head is estimated apart
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_saved_tensors(precision):
    config = GPTConfig(n_vocab=97, n_ctx=64, n_embd=64, n_head=4, n_layer=3)
    model = GPT(config).train()
    tokens = torch.randint(0, config.n_vocab, (2, 64))
    measured = saved_activation_bytes(model, tokens, autocast=precision == "bf16")
    if precision == "bf16":  # remove autocast's bf16 weight copies (estimate: temporaries)
        n_matrix = sum(p.numel() for n, p in model.named_parameters()
                       if p.dim() == 2 and n != "wpe.weight")  # wte: the head's matmul
        measured -= 2 * n_matrix
    est = estimate_memory(config, 2, 64, precision=precision)
    assert est.activations == pytest.approx(measured, rel=0.05)


def test_estimate_options_move_the_peak_the_right_way():
    c = GPTConfig(n_embd=1600, n_head=25, n_layer=48)  # 1558M
    base = estimate_memory(c, 1, 1024)
    assert base.params == 4 * 1_557_611_200
    assert base.optimizer == 2 * base.params and base.grads == base.params
    ckpt = estimate_memory(c, 1, 1024, activation_checkpointing=True)
    assert ckpt.activations < base.activations / 10
    assert estimate_memory(c, 1, 1024, chunked_loss=True).head < base.head
    fsdp = estimate_memory(c, 1, 1024, fsdp_world_size=4)
    assert fsdp.params == base.params // 4 and fsdp.optimizer == base.optimizer // 4
    only = estimate_memory(c, 1, 1024, trainable="transformer")
    assert only.grads < base.grads and only.params == base.params
    # the target: some option set fits a full 1558M fine-tune in 24 GiB on one GPU
    best = estimate_memory(c, 1, 1024, precision="bf16", optimizer="adafactor",
                           activation_checkpointing=True, fused_optimizer=True)
    assert best.peak < 22 * GB < estimate_memory(c, 1, 1024, precision="bf16").peak


def test_optimizer_state_sizes():
    shapes = [(1024, 768), (768,)]
    n = 1024 * 768 + 768
    assert optimizer_bytes(shapes, "adamw") == 8 * n
    assert optimizer_bytes(shapes, "sgd") == 0
    assert optimizer_bytes(shapes, "adafactor") == 4 * (1024 + 768 + 768)
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_bytes(shapes, "lion")
    assert set(OPTIMIZERS) >= {"adamw", "adafactor"}


@pytest.mark.parametrize("bad", [{"precision": "fp8"}, {"trainable": "heads"},
                                 {"fsdp_world_size": 0}, {"seq_len": 2048}])
def test_estimate_rejects_bad_options(bad):
    kw = {"batch_size": 1, **bad}
    with pytest.raises(ValueError):
        estimate_memory(GPTConfig(), **kw)

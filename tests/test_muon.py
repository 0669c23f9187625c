"""--optimizer muon: torch.optim.Muon for the blocks' matrices and AdamW for the rest, as one
optimizer that steps as the two of torch's own would, follows the schedule, and resumes to
the bit."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_model
from test_train import (
    RESUME_FLAGS,
    args,
    losses,
    main,
    make_model_dir,
    synthetic_text,
    weights,
)

from gpt2.errors import UserError
from gpt2.model import GPTConfig
from gpt2.training.optim import (
    MUON_ADAM,
    MuonAdamW,
    build_optimizer,
    lr_at,
    muon_groups,
    set_lr,
)


def tiny():
    return make_model(GPTConfig(n_vocab=97, n_ctx=16, n_embd=32, n_head=4, n_layer=2)).train()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = muon_groups(model, 0.1)
    muon = sorted(names[id(p)] for p in groups[0]["params"])
    assert groups[0]["muon"] and muon == sorted(
        f"h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    rest = [names[id(p)] for g in groups[1:] for p in g["params"]]
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias",
            "h.1.attn.c_attn.bias"} <= set(rest) and "lm_head.weight" not in rest
    assert [g["weight_decay"] for g in groups[1:]] == [0.1, 0.0]


def test_one_optimizer_steps_as_torchs_muon_and_adamw_do():
    ours_model, ref_model = tiny(), tiny()
    ours = build_optimizer(ours_model, "muon", lr=3e-3, weight_decay=0.1, muon_lr=0.02)
    ref_groups = muon_groups(ref_model, 0.1)
    ref = [torch.optim.Muon([ref_groups[0]], lr=0.02, momentum=0.95, nesterov=True,
                            weight_decay=0.1),
           torch.optim.AdamW(ref_groups[1:], lr=3e-3, weight_decay=0.1, fused=True,
                             **MUON_ADAM)]
    ids = torch.randint(0, 97, (4, 16))
    for step in range(1, 4):
        factor = lr_at(step, 1.0, "cosine", warmup_steps=1, max_steps=3)
        set_lr(ours, 3e-3 * factor)
        for opt in ref:
            for g in opt.param_groups:
                g["lr"] = (0.02 if opt is ref[0] else 3e-3) * factor
        for model, opts in ((ours_model, [ours]), (ref_model, ref)):
            for opt in opts:
                opt.zero_grad()
            model(ids, targets=ids).backward()
            for opt in opts:
                opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert ours.param_groups[0]["lr"] == pytest.approx(0.02 * factor)


def test_state_dict_round_trip_keeps_both_halves():
    model = tiny()
    opt = build_optimizer(model, "muon", lr=1e-3)
    ids = torch.randint(0, 97, (2, 16))
    model(ids, targets=ids).backward()
    opt.step()
    other = build_optimizer(copy.deepcopy(model), "muon", lr=1e-3)
    other.load_state_dict(opt.state_dict())
    assert isinstance(other, MuonAdamW)
    assert other._muon.state is other.state and other._adam.state is other.state
    assert other._muon.param_groups[0] is other.param_groups[0]
    kinds = {frozenset(s) for s in other.state.values()}
    assert frozenset({"momentum_buffer"}) in kinds and any("exp_avg" in k for k in kinds)


def test_muon_training_falls_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.txt"
    data.write_text(synthetic_text())
    model_dir = make_model_dir(tmp_path / "tiny")
    flags = {**RESUME_FLAGS, "optimizer": "muon", "muon_lr": 0.02, "learning_rate": 3e-3,
             "lr_schedule": "cosine"}
    assert main(args(data, model_dir, run_name="whole", max_steps=8, **flags)) == 0
    assert main(args(data, model_dir, run_name="split", max_steps=3, **flags)) == 0
    assert main(args(data, model_dir, run_name="split", max_steps=8, **flags)) == 0
    whole, split = tmp_path / "checkpoint/whole", tmp_path / "checkpoint/split"
    assert losses(split) == losses(whole)  # bitwise
    w1, w2 = weights(whole), weights(split)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert losses(whole)[-1] < losses(whole)[0]


def test_muon_with_fsdp_is_one_line(tmp_path, monkeypatch):
    from gpt2.training.config import parse_config

    with pytest.raises(UserError, match="--optimizer muon cannot be combined with --fsdp"):
        parse_config(["--dataset", "x.txt", "--optimizer", "muon", "--fsdp"]).validate()


def test_a_copied_optimizer_steps_as_the_original():
    """copy/pickle carry only the groups and the state: the inner optimizers are rebuilt."""
    model = tiny()
    opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02)
    ids = torch.randint(0, 97, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        model(ids, targets=ids).backward()
        if not opt.state:
            opt.step()
    twin = copy.deepcopy(opt)  # its groups hold copies of the parameters (without gradients)
    for g, h in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(g["params"], h["params"]):
            q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for g, h in zip(opt.param_groups, twin.param_groups):
        assert g["lr"] == h["lr"] and g["muon"] == h["muon"]
        for p, q in zip(g["params"], h["params"]):
            assert p is not q and torch.equal(p, q)

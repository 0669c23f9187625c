"""Preference tuning (DPO with sigmoid/IPO/hinge losses, ORPO, SimPO) against TRL itself: the
same records tokenize to the same ids as TRL's trainers make, and on the same batch of the same
weights our losses, metrics and gradients equal DPOTrainer's, ORPOTrainer's and CPOTrainer's
(SimPO); packed pairs equal unpacked ones; runs learn, resume to the bit and keep content text.
"""

from __future__ import annotations

import copy
import math
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data.preferences import Pair, extract_prompt, load_pairs
from gpt2.errors import UserError
from gpt2.io.hf import export_huggingface, hf_name
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer.chat import ChatTemplate
from gpt2.tokenizer.files import load_encoder
from gpt2.training.batches import pack_rows
from gpt2.training.config import TrainConfig
from gpt2.training.objectives import Preference, sequence_logps
from gpt2.training.pairs import collate_pairs
from test_train import _isolated, make_model_dir, metrics  # noqa: F401

CONFIG = GPTConfig(n_vocab=257, n_ctx=128, n_embd=32, n_head=4, n_layer=2)
STANDARD = [{"prompt": f"q{i} what?", "chosen": " yes" * (i % 3 + 1),
             "rejected": " no" * (i % 2 + 1)} for i in range(5)]
CHATS = [{"prompt": [{"role": "user", "content": f"colour {i}?"}],
          "chosen": [{"role": "assistant", "content": "blue" * (i % 2 + 1)}],
          "rejected": [{"role": "assistant", "content": "green"}]} for i in range(3)]


@pytest.fixture
def byte_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "bytes", n_ctx=128)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def models(tmp_path: Path, byte_dir: Path) -> tuple[GPT, GPT, Path, Path]:
    """A reference model and a policy moved away from it, each also as a transformers dir."""
    policy, ref = _dpo_models()
    export_huggingface(ref, tmp_path / "hf_ref", encoder_dir=byte_dir)
    export_huggingface(policy, tmp_path / "hf_policy", encoder_dir=byte_dir)
    return policy, ref, tmp_path / "hf_policy", tmp_path / "hf_ref"


def hf_model(path: Path):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(path)


def tokenizer(path: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def trl_args(cls, tmp_path: Path, **kw):
    kw.setdefault("per_device_train_batch_size", len(STANDARD))
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, **kw)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(dataset="x", **kw)


def our_gradients_match(policy: GPT, hf, atol: float = 1e-5) -> None:
    for name, p in policy.named_parameters():
        hf_key, transpose = hf_name(name)
        theirs = hf.get_parameter(hf_key).grad
        theirs = theirs.t() if transpose else theirs
        torch.testing.assert_close(p.grad, theirs, atol=atol, rtol=1e-4, msg=name)


def packed(pairs: list[Pair], n_ctx: int = 128, reference=None):
    return collate_pairs(pack_rows(pairs, n_ctx, True), n_ctx, 256, reference)


# --- the records: read and tokenized as TRL's DPOTrainer does ----------------------------------

@pytest.mark.parametrize("rows", ["standard", "chats", "implicit"])
def test_pairs_tokenize_as_trls_dpo_trainer(tmp_path, byte_dir, rows):
    from trl import DPOConfig, DPOTrainer

    records = {"standard": STANDARD, "chats": CHATS,
               "implicit": [{"chosen": r["prompt"] + r["chosen"],
                             "rejected": r["prompt"] + r["rejected"]} for r in STANDARD] +
               [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in CHATS]}[rows]
    _, _, hf_policy, _ = models(tmp_path, byte_dir)
    ours = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), load_encoder(byte_dir),
                      ChatTemplate.default(), n_ctx=128).pairs
    # (TRL reads one kind per dataset: the two halves of "implicit" separately)
    theirs = []
    for part in ([records[:5], records[5:]] if rows == "implicit" else [records]):
        trainer = DPOTrainer(model=hf_model(hf_policy), args=trl_args(DPOConfig, tmp_path),
                             train_dataset=dataset(part), processing_class=tokenizer(hf_policy))
        theirs += list(trainer.train_dataset)
    assert len(ours) == len(theirs) == len(records)
    for pair, row in zip(ours, theirs):
        assert pair.chosen.tolist() == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected.tolist() == row["prompt_ids"] + row["rejected_ids"]
        assert pair.prompt_len == len(row["prompt_ids"])


def test_extract_prompt_is_trls():
    from trl import extract_prompt as trls

    for r in STANDARD + CHATS + [{"prompt": "a b", "chosen": " c d", "rejected": " c e"}]:
        chosen, rejected = r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]
        theirs = trls({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"],
                                                    theirs["rejected"])


# --- the losses: TRL's on the same batch and weights ------------------------------------------

def trl_pairs(rows: list[dict]) -> list[Pair]:
    """TRL's tokenized rows as our pairs (the same ids either way)."""
    out = []
    for i, row in enumerate(rows):
        if "prompt_ids" in row:  # DPOTrainer
            p = row["prompt_ids"]
            out.append(Pair(np.asarray(p + row["chosen_ids"], np.int32),
                            np.asarray(p + row["rejected_ids"], np.int32), len(p), i))
            continue
        # ORPOTrainer / CPOTrainer: whole sequences, labels -100 over the prompt
        n = sum(1 for x in row["chosen_labels"] if x == -100)
        assert n == sum(1 for x in row["rejected_labels"] if x == -100)
        out.append(Pair(np.asarray(row["chosen_input_ids"], np.int32),
                        np.asarray(row["rejected_input_ids"], np.int32), n, i))
    return out


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_metrics_and_gradients_equal_trls_dpo_trainer(tmp_path, byte_dir, loss):
    from trl import DPOConfig, DPOTrainer

    policy, ref, hf_policy, hf_ref = models(tmp_path, byte_dir)
    trainer = DPOTrainer(model=hf_model(hf_policy), ref_model=hf_model(hf_ref),
                         args=trl_args(DPOConfig, tmp_path, beta=0.3, loss_type=[loss]),
                         train_dataset=dataset(STANDARD), processing_class=tokenizer(hf_policy))
    rows = list(trainer.train_dataset)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, trainer.data_collator(rows), False)
    theirs.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    objective = Preference(cfg(objective="dpo", dpo_loss=loss, beta=0.3),
                           lambda b: sequence_logps(ref, b)[0].detach())
    batch = packed(trl_pairs(rows))
    assert batch.inputs.size(0) < len(rows)  # packed: several pairs in a row
    ours, m = objective(policy.train(), batch)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert m[key].item() == pytest.approx(logged[key], abs=1e-5), key
    our_gradients_match(policy, trainer.model)


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid(tmp_path, byte_dir):
    """--label_smoothing: TRL's DPOTrainer dropped it from "sigmoid"; its CPOTrainer keeps the
    conservative form, which DPO applies to the reference-adjusted log-ratios."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, ref, hf_policy, _ = models(tmp_path, byte_dir)
    tok = tokenizer(hf_policy)
    tok.pad_token = tok.eos_token
    trainer = CPOTrainer(model=hf_model(hf_policy), args=trl_args(
        CPOConfig, tmp_path, beta=0.3, label_smoothing=0.2, loss_type="sigmoid"),
        train_dataset=dataset(STANDARD), processing_class=tok)
    batch = packed(trl_pairs(list(trainer.train_dataset)))
    with torch.no_grad():
        pol, ref_logps = sequence_logps(policy, batch)[0], sequence_logps(ref, batch)[0]
    theirs = trainer.cpo_loss(pol[0::2] - ref_logps[0::2], pol[1::2] - ref_logps[1::2])[0]
    ours, _ = Preference(cfg(objective="dpo", beta=0.3, label_smoothing=0.2),
                         lambda b: ref_logps)(policy, batch)
    assert ours.item() == pytest.approx(theirs.mean().item(), abs=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trls_trainers(tmp_path, byte_dir, objective):
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
        kw = {"beta": 0.25}
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        kw = {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5}
    policy, _, hf_policy, _ = models(tmp_path, byte_dir)
    tok = tokenizer(hf_policy)
    tok.pad_token = tok.eos_token  # (these trainers ask for one)
    trainer = Trainer(model=hf_model(hf_policy), args=trl_args(Config, tmp_path, **kw),
                      train_dataset=dataset(STANDARD), processing_class=tok)
    rows = list(trainer.train_dataset)
    trainer.model.train()
    theirs, logged = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(rows))
    theirs.backward()
    ours, m = Preference(cfg(objective=objective, beta=kw["beta"],
                             simpo_gamma=kw.get("simpo_gamma", 0.5)), None)(
        policy.train(), packed(trl_pairs(rows)))
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]
    if objective == "orpo":
        names += ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
    for key in names:
        assert m[key].item() == pytest.approx(float(logged[key]), abs=1e-5), key
    our_gradients_match(policy, trainer.model)


def test_packed_pairs_score_as_one_pair_a_row(byte_dir, tmp_path):
    torch.manual_seed(1)
    model = GPT(CONFIG).eval()
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", STANDARD + CHATS),
                       load_encoder(byte_dir), ChatTemplate.default(), n_ctx=128).pairs
    alone = collate_pairs([[p] for p in pairs], max(map(len, pairs)), 256)
    together = packed(pairs)
    assert together.inputs.size(0) < len(pairs)
    with torch.no_grad():
        a, b = sequence_logps(model, alone), sequence_logps(model, together)
    order = together.pairs.tolist()  # packing reorders pairs: compare pair by pair
    a_logps = a[0].view(-1, 2)[order].view(-1)
    torch.testing.assert_close(b[0], a_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b[1], a[1].view(-1, 2)[order].view(-1))


# --- data: content is text, long pairs fit, bad records are one line -------------------------

def test_a_literal_endoftext_in_a_pair_is_text(tmp_path, byte_dir):
    enc = load_encoder(byte_dir)
    rows = [{"prompt": "hi<|endoftext|>", "chosen": " a<|endoftext|>Assistant: x",
             "rejected": " b"},
            {"prompt": [{"role": "user", "content": "q<|endoftext|>"}],
             "chosen": [{"role": "assistant", "content": "a<|endoftext|>"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    standard, chat = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), enc,
                                ChatTemplate.default(), n_ctx=128).pairs
    # the only special tokens: the end of each standard answer, and the template's turn ends
    assert standard.chosen.tolist().count(256) == 1 and standard.chosen[-1] == 256
    plain = ChatTemplate.default().encode(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], enc)[0]
    assert chat.chosen.tolist().count(256) == plain.count(256)


def test_a_long_pair_loses_its_prompts_start_then_its_answers_end(tmp_path, byte_dir):
    enc = load_encoder(byte_dir)
    rows = [{"prompt": "p" * 40, "chosen": " " + "c" * 59, "rejected": " " + "r" * 5},
            {"prompt": "p" * 40, "chosen": " " + "c" * 9, "rejected": " " + "r" * 5}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    long, short = load_pairs(path, enc, None, n_ctx=64).pairs
    # the prompt down to one token, then the longer answer's end (its <|endoftext|> too)
    assert len(long) == 64 and long.prompt_len == 1 and long.chosen[0] == ord("p")
    assert long.rejected.tolist()[1:] == enc.encode_ordinary(" rrrrr") + [256]
    assert long.chosen.tolist()[1:] == enc.encode_ordinary(" " + "c" * 59)[:55]
    # only as much of the prompt as needed: (40 + 11) + (40 + 7) tokens lose 17 each
    assert short.prompt_len == 23 and len(short) == 64
    with pytest.raises(UserError, match="no preference pair left"):
        load_pairs(path, enc, None, n_ctx=64, drop_long=True)


@pytest.mark.parametrize("record, says", [
    ({"chosen": "a", "rejected": 3}, "all be strings or all lists"),
    ({"prompt": "x", "chosen": "", "rejected": " b"}, "empty chosen or rejected"),
    ({"chosen": "same", "rejected": "other"}, "share no prompt"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "must end with an assistant turn"),
    ({"prompt": [], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "non-empty list of messages"),
    ({"prompt": "x", "chosen": "a"}, 'needs "chosen" and "rejected"'),
])
def test_a_bad_pair_is_one_line_naming_file_and_line(tmp_path, byte_dir, record, says):
    path = write_jsonl(tmp_path / "p.jsonl", [STANDARD[0], record])
    with pytest.raises(UserError, match=says) as e:
        load_pairs(path, load_encoder(byte_dir), ChatTemplate.default(), n_ctx=64)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


# --- training runs: learning, references, resume ---------------------------------------------

def upper_pairs(n: int, seed: int = 0) -> list[dict]:
    """The chat quickstart's task as preferences: the upper-cased word beats the word itself."""
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star"]
    rows = []
    for _ in range(n):
        w = words[rng.integers(len(words))]
        rows.append({"prompt": f"upper {w}:", "chosen": f" {w.upper()}", "rejected": f" {w}"})
    return rows


def run(tmp_path: Path, model_dir: Path, objective: str, name: str, steps: int, *extra: str,
        **flags) -> Path:
    from gpt2.commands.train import main

    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        write_jsonl(data, upper_pairs(40))
    base = {"dataset": data, "model_dir": model_dir, "batch_size": 2, "learning_rate": 3e-3,
            "seed": 7, "sample_every": 0, "save_every": 0, "print_every": 100,
            "val_every": 4, "val_fraction": 0.2, "objective": objective, "run_name": name,
            "max_steps": steps, **flags}
    argv = [x for k, v in base.items() for x in (f"--{k}", str(v))] + list(extra)
    assert main(argv) == 0
    return tmp_path / "checkpoint" / name


def pretrained(tmp_path: Path) -> Path:
    from gpt2.io.model_dir import save_model

    torch.manual_seed(3)
    byte_dir = make_model_dir(tmp_path / "bytes32")
    return save_model(GPT(GPTConfig(n_vocab=257, n_ctx=32, n_embd=32, n_head=4, n_layer=2)),
                      tmp_path / "pretrained", encoder_dir=byte_dir)


def steps(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]


@pytest.mark.parametrize("reference", ["precomputed", "copy", "adapters"])
def test_dpo_starts_at_log_2_learns_and_resumes_to_the_bit(tmp_path, reference):
    """Policy = reference at the start: the first validation loss is ln 2 exactly, whatever
    the reference is. Stopped at step 4 and resumed (the stored reference log-probs, the copy read
    again from where the run started, or the adapters) it computes what one run does."""
    start = pretrained(tmp_path)
    extra = ("--lora_rank", "4") if reference == "adapters" else ()
    flags = {"reference": reference, "dropout": 0.1, "noise": 0.05,
             "learning_rate": 3e-2 if reference == "adapters" else 3e-3}
    whole = run(tmp_path, start, "dpo", "whole", 8, *extra, **flags)
    run(tmp_path, start, "dpo", "split", 4, *extra, **flags)
    split = run(tmp_path, start, "dpo", "split", 8, *extra, **flags)
    ours, theirs = steps(split), steps(whole)
    first = metrics(split)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert first["val_rewards/margins"] == pytest.approx(0, abs=1e-6)
    for a, b in zip(ours, theirs):  # bitwise: every loss and metric, not the timings
        assert {k: v for k, v in a.items() if "sec" not in k and k != "elapsed"} == \
            {k: v for k, v in b.items() if "sec" not in k and k != "elapsed"}
    val = [m for m in metrics(whole) if "val_rewards/margins" in m]
    assert val[-1]["val_rewards/margins"] > val[0]["val_rewards/margins"] + 0.02
    assert val[-1]["val_rewards/accuracies"] > 0.5
    stored = list(split.glob("model-*/reference_logps.safetensors"))
    assert bool(stored) == (reference == "precomputed")


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_runs_learn_to_prefer_the_chosen_answer(tmp_path, objective):
    run_dir = run(tmp_path, pretrained(tmp_path), objective, objective, 12,
                  *(["--tensorboard"] if objective == "orpo" else []),
                  beta=0.5 if objective == "orpo" else 2.0, val_every=6)
    val = [m for m in metrics(run_dir) if "val_rewards/margins" in m]
    assert val[-1]["val_rewards/margins"] > val[0]["val_rewards/margins"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    if objective == "orpo":  # gpt2 plot draws the preference accuracy beside the loss
        from gpt2.commands.plot import plot_runs

        assert plot_runs([run_dir], tmp_path / "curves.png").stat().st_size > 10_000
        # and TensorBoard has the metrics under TRL's names
        from tensorboard.backend.event_processing.plugin_event_accumulator import \
            EventAccumulator
        from tensorboard.util.tensor_util import make_ndarray

        events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
        for tag, key in (("train/rewards/margins", "rewards/margins"),
                         ("validation/rewards/accuracies", "val_rewards/accuracies"),
                         ("train/nll_loss", "nll_loss")):
            got = [float(make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
            np.testing.assert_allclose(got, [m[key] for m in metrics(run_dir) if key in m],
                                       rtol=1e-6)


def test_a_dataset_that_does_not_hold_what_the_objective_learns_is_refused(tmp_path):
    from gpt2.commands.train import main

    text = tmp_path / "t.txt"
    text.write_text("plain text " * 100)
    start = pretrained(tmp_path)
    with pytest.raises(UserError, match="holds no preference pairs"):
        main(["--dataset", str(text), "--model_dir", str(start), "--objective", "dpo"])
    prefs = write_jsonl(tmp_path / "p.jsonl", upper_pairs(4))
    with pytest.raises(UserError, match="--objective dpo, orpo or simpo"):
        main(["--dataset", str(prefs), "--model_dir", str(start)])
    with pytest.raises(UserError, match="--reference adapters needs --lora_rank"):
        main(["--dataset", str(prefs), "--model_dir", str(start), "--objective", "dpo",
              "--reference", "adapters"])


# --- GRPO --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kl", [0.0, 0.04])
def test_grpo_loss_and_gradients_equal_trls_grpo_trainer(tmp_path, byte_dir, kl):
    """A fixed batch of completions, advantages and old log-probs (moved off the current ones,
    so that clipping bites) through GRPOTrainer._compute_loss and through ours."""
    from trl import GRPOConfig, GRPOTrainer

    from gpt2.training.grpo import CompletionTokens, grpo_token_loss

    policy, ref, hf_policy, hf_ref = models(tmp_path, byte_dir)
    tok = tokenizer(hf_policy)
    tok.pad_token = tok.eos_token
    prompts = [f"q{i}:" for i in range(4)]  # one length: no prompt padding
    trainer = GRPOTrainer(model=hf_model(hf_policy), reward_funcs=lambda completions, **k: [
        0.0] * len(completions), args=trl_args(GRPOConfig, tmp_path, num_generations=4,
                                                temperature=0.7, beta=kl, epsilon=0.1,
                                                per_device_train_batch_size=4),
        train_dataset=dataset([{"prompt": p} for p in prompts]), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    enc = load_encoder(byte_dir)
    rng = np.random.default_rng(0)
    prompt_ids = [enc.encode_ordinary(p) for p in prompts]
    completions = [rng.integers(0, 256, size=n).tolist() + [256] for n in (3, 7, 1, 5)]
    width = max(map(len, completions))
    seqs = [(np.asarray(p + c, np.int32), len(p)) for p, c in zip(prompt_ids, completions)]
    tokens = CompletionTokens(seqs, 256, torch.device("cpu"))
    with torch.no_grad():
        old = tokens.logps(policy, 0.7) + torch.from_numpy(
            rng.normal(0, 0.2, tokens.shape).astype(np.float32)) * tokens.mask
        ref_logps = tokens.logps(ref, 0.7)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    inputs = {"prompt_ids": torch.tensor(prompt_ids), "prompt_mask": torch.ones(4, 3, dtype=int),
              "completion_ids": torch.tensor([c + [256] * (width - len(c)) for c in completions]),
              "completion_mask": tokens.mask.long(), "advantages": advantages,
              "old_per_token_logps": old, "num_items_in_batch": tokens.mask.sum(),
              "ref_per_token_logps": ref_logps}
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    ours, stats = grpo_token_loss(tokens.logps(policy.train(), 0.7), old, advantages,
                                  tokens.mask, 0.1, kl, ref_logps)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert stats["clip_ratio/region_mean"] > 0
    our_gradients_match(policy, trainer.model)


def test_group_advantages_are_trls_group_scaling():
    from gpt2.training.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, std = group_advantages(rewards, 4)
    g = rewards.view(2, 4)
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(advantages, expected.view(-1))
    assert advantages[4:].abs().max() == 0 and std[4:].max() == 0  # a group all alike: nothing


UPPER = '''def upper(prompts, completions, **fields):
    return [sum(ch.isupper() for ch in c) / max(1, len(c)) for c in completions]


def wrong_length(prompts, completions, **fields):
    return [1.0]


def broken(prompts, completions, **fields):
    return [1 / 0 for c in completions]
'''


def grpo_run(tmp_path: Path, name: str, steps: int, **flags) -> Path:
    from gpt2.commands.train import main

    (tmp_path / "upper_reward.py").write_text(UPPER)
    words = ["cat", "dog", "sun", "tree", "bird"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"upper {w}:", "answer": w.upper()}
                                                    for w in words * 8])
    base = {"dataset": data, "model_dir": make_model_dir(tmp_path / "tiny"), "init": "fresh",
            "batch_size": 2, "learning_rate": 1e-2, "seed": 7, "sample_every": 0,
            "save_every": 0, "print_every": 100, "val_every": 0, "objective": "grpo",
            "num_generations": 4, "max_completion_length": 8, "reward": "upper_reward:upper",
            "run_name": name, "max_steps": steps, **flags}
    assert main([x for k, v in base.items() for x in (f"--{k}", str(v))]) == 0
    return tmp_path / "checkpoint" / name


def test_grpo_learns_a_reward_of_your_own_and_resumes_to_the_bit(tmp_path):
    """A reward module beside the data (the share of upper-case letters): a random model's
    reward climbs from ~0.15; stopped and resumed, the run samples and learns what one
    uninterrupted run does."""
    whole = grpo_run(tmp_path, "whole", 32)
    grpo_run(tmp_path, "split", 16)
    split = grpo_run(tmp_path, "split", 32)
    rewards = [m["reward"] for m in steps(whole)]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2
    for a, b in zip(steps(split), steps(whole)):
        assert {k: v for k, v in a.items() if "sec" not in k and k != "elapsed"} == \
            {k: v for k, v in b.items() if "sec" not in k and k != "elapsed"}
    assert {"rewards/upper/mean", "rewards/upper/std", "reward_std", "frac_reward_zero_std",
            "completions/mean_length", "clip_ratio/region_mean"} <= set(steps(whole)[0])


@pytest.mark.parametrize("reward, says", [
    ("no_such_module:f", "--reward no_such_module:f: cannot import no_such_module"),
    ("upper_reward:nothing", "--reward upper_reward:nothing: upper_reward has no nothing"),
    ("upper_reward:wrong_length", "--reward wrong_length: returned list of 1 values for 8"),
    ("upper_reward:broken", "--reward broken: ZeroDivisionError: division by zero (at "),
    ("exact_match", None),
])
def test_a_reward_that_cannot_run_is_one_line(tmp_path, reward, says):
    if says is None:  # exact_match reads the records' "answer": runs (and scores 0 here)
        assert steps(grpo_run(tmp_path, "em", 1, reward=reward))[0]["reward"] == 0.0
        return
    with pytest.raises(UserError) as e:
        grpo_run(tmp_path, "bad", 1, reward=reward)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


# --- DDP: two ranks' averaged gradient is one process's ---------------------------------------

def _two_pairs() -> list[Pair]:
    rng = np.random.default_rng(5)
    return [Pair(rng.integers(0, 256, 9).astype(np.int32),
                 rng.integers(0, 256, 12).astype(np.int32), 4, i) for i in range(2)]


def _dpo_models() -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    ref = GPT(CONFIG).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy, ref


def _dpo_rank(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from gpt2.training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    policy, ref = _dpo_models()
    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    pair = _two_pairs()[rank]
    objective = Preference(cfg(objective="dpo", beta=0.3),
                           lambda b: sequence_logps(ref, b)[0].detach())
    loss, _ = objective(ddp, collate_pairs([[pair]], len(pair), 256))
    loss.backward()
    torch.save({n: p.grad for n, p in policy.named_parameters()}, f"{out}.{rank}")
    distributed.shutdown()


def test_dpo_on_two_ranks_equals_one_process(tmp_path):
    from bounded import spawn
    from test_distributed import free_port

    out = str(tmp_path / "grads")
    spawn(_dpo_rank, args=(free_port(), out), nprocs=2, timeout=90)
    policy, ref = _dpo_models()
    pairs = _two_pairs()
    loss, _ = Preference(cfg(objective="dpo", beta=0.3),
                         lambda b: sequence_logps(ref, b)[0].detach())(
        policy, collate_pairs([[p] for p in pairs], max(map(len, pairs)), 256))
    loss.backward()
    for rank in (0, 1):
        grads = torch.load(f"{out}.{rank}")
        for name, p in policy.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_bf16_runs_the_new_objectives(tmp_path, objective):
    """--precision bf16 (autocast on the CPU, as on a GPU): finite losses and metrics."""
    if objective == "dpo":
        run_dir = run(tmp_path, pretrained(tmp_path), "dpo", "bf16", 3, precision="bf16")
    else:
        run_dir = grpo_run(tmp_path, "bf16", 3, precision="bf16")
    for m in steps(run_dir):
        assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float)), m


def test_ctrl_c_during_dpo_saves_the_reference_and_resumes(tmp_path):
    """SIGINT mid-run: the steps done are saved with the stored reference log-probs, exit 0;
    the resumed run reads them back (no second reference pass) and computes what one
    uninterrupted run does."""
    import os
    import signal
    import sys

    import bounded

    start = pretrained(tmp_path)
    write_jsonl(tmp_path / "prefs.jsonl", upper_pairs(40))
    flags = ["--dataset", str(tmp_path / "prefs.jsonl"), "--model_dir", str(start),
             "--objective", "dpo", "--reference", "precomputed", "--batch_size", "2",
             "--seed", "7", "--sample_every", "0", "--save_every", "0", "--val_every", "0",
             "--learning_rate", "3e-3", "--print_every", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "GPT2_CACHE": str(tmp_path / "cache")}
    with bounded.Proc([sys.executable, "-m", "gpt2", "train", *flags, "--run_name", "sig",
                       "--max_steps", "100000"], env=env, cwd=tmp_path) as proc:
        proc.wait_for(lambda line: line.startswith("[3 |"), timeout=120)
        proc.signal(signal.SIGINT)
        done = proc.finish(timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    saved = metrics(tmp_path / "checkpoint/sig")[-1]["step"]
    ckpt = tmp_path / f"checkpoint/sig/model-{saved}"
    assert (ckpt / "reference_logps.safetensors").is_file()
    from gpt2.commands.train import main

    total = saved + 2
    resumed = bounded.run([sys.executable, "-m", "gpt2", "train", *flags, "--run_name", "sig",
                           "--max_steps", str(total)], env=env, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0 and "Computing the reference" not in resumed.stdout
    assert main([*flags, "--run_name", "whole", "--max_steps", str(total)]) == 0
    a, b = steps(tmp_path / "checkpoint/sig"), steps(tmp_path / "checkpoint/whole")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_several_rewards_are_weighted():
    from gpt2.training.grpo import Rewards

    rewards = Rewards.of(cfg(objective="grpo", reward="exact_match,regex",
                             reward_weights="1,0.5", reward_regex="[A-Z]+"))
    assert rewards.names == ["exact_match", "regex"] and rewards.weights == [1.0, 0.5]
    table = rewards(["p"] * 3, [" CAT", "cat", "DOG "], [[1], [2], [3]],
                    [{"answer": "CAT"}, {"answer": "CAT"}, {"answer": "CAT"}])
    np.testing.assert_array_equal(table, [[1, 1], [0, 0], [0, 1]])
    assert (np.nansum(table * np.asarray(rewards.weights), axis=1) == [1.5, 0, 0.5]).all()
    with pytest.raises(UserError, match="--reward_weights: 1 weights for 2 rewards"):
        Rewards.of(cfg(objective="grpo", reward="exact_match,regex", reward_weights="1"))

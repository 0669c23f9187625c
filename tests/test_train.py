"""Training: golden losses, loss falls, exact resume, Ctrl-C saves, checkpoints load, bad input.

Every run here is a tiny model (2 layers, 32 wide, 32-token context) over a byte-level
vocabulary of 257 ids (GPT-2's byte alphabet with no merges, plus <|endoftext|>), so each
training run takes about a second on 2 CPU cores.

Regenerate the golden losses (only after a deliberate change to the numerics) with:

    .venv/bin/python tests/test_train.py --update-golden
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bounded
from gpt2.training import memory, optim, parallelize
from gpt2.cli import run
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from helpers import lm_loss
from gpt2.commands.train import main
from gpt2.training.config import parse_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "train_tiny.json"
GOLDEN_TOL = 1e-5  # CPU fp32; the same torch build reproduces the losses bitwise
TINY = {"n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
WORDS = ("the of and to in is was for that on as with by he at from his it an were are which "
         "this be or had not but first one their its new after who they have her she two been "
         "other when there all during into school time may years more most only over city "
         "some world would where later up such used many can state about national out known "
         "university united then made").split()


# --- fixtures ----------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + n))
            n += 1
    return table


def make_model_dir(path: Path, **hparams) -> Path:
    """hparams.json + a byte-level GPT-2 vocabulary (id = byte value, no merges; eot = 256)."""
    path.mkdir(parents=True, exist_ok=True)
    encoder = {c: i for i, c in enumerate(_byte_alphabet())}
    encoder["<|endoftext|>"] = 256
    (path / "encoder.json").write_text(json.dumps(encoder))
    (path / "vocab.bpe").write_text("#version: 0.2\n")
    (path / "hparams.json").write_text(json.dumps({"n_vocab": 257, **TINY, **hparams}))
    return path


def synthetic_text(n_words: int = 6000, seed: int = 0) -> str:
    """Deterministic pseudo-English (stable across Python versions: random.Random(int))."""
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(4, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return "\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)) + "\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test in its own folder, with its own dataset cache."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "tiny")


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text(synthetic_text())
    return path


def args(data: Path, model_dir: Path, *extra: str, **flags) -> list[str]:
    """A fresh tiny run: random init from model_dir, quiet, no sampling unless asked."""
    base = {"dataset": data, "model_dir": model_dir, "init": "fresh", "batch_size": 2,
            "learning_rate": 3e-3, "seed": 7, "sample_every": 0, "save_every": 0,
            "print_every": 100}
    base.update(flags)
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out + list(extra)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def newest(path: Path) -> Path:
    """A run directory's newest checkpoint (what its counter names), or the path itself."""
    from gpt2.files.paths import follow_run_dir

    return follow_run_dir(Path(path))


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(newest(path) / "model.safetensors"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --- golden, learning, resume ------------------------------------------------------------------

GOLDEN_FLAGS = dict(max_steps=8, accumulate_gradients=2, optimizer="adamw", weight_decay=0.1,
                    lr_schedule="cosine", warmup_steps=2, grad_clip=1.0, dropout=0.1, noise=0.05)


def golden_run(tmp: Path) -> list[float]:
    text_path = tmp / "golden.txt"
    text_path.write_text(synthetic_text(3000, seed=1))
    model = make_model_dir(tmp / "golden-model")
    assert main(args(text_path, model, run_name="golden", **GOLDEN_FLAGS)) == 0
    return losses(tmp / "checkpoint" / "golden")


@pytest.mark.parametrize("optimizer,peak,wd,clip", [("adamw", 3e-3, 0.1, 1.0),
                                                    ("sgd", 0.3, 0.0, 0.0)])
def test_training_equals_transformers_on_the_same_weights_and_batches(
        tmp_path, data, monkeypatch, optimizer, peak, wd, clip):
    """Our trainer's per-step losses against an independent loop: transformers'
    GPT2LMHeadModel from the same starting weights, fed the batches our run drew (noise
    included), with torch's AdamW over the same groups (matrices decayed), the schedule written
    out here, gradient clipping and accumulation (micro-batch losses averaged; SGD without
    clipping sees the gradient's scale, which Adam and clipping would hide)."""
    import math

    import transformers

    import gpt2.training.batches as batches_module
    from gpt2.io.hf import export_huggingface
    from gpt2.io.model_dir import save_model

    start = make_model_dir(tmp_path / "start")
    torch.manual_seed(3)
    save_model(GPT(GPTConfig(n_vocab=257, **TINY)), start)
    drawn, real_next = [], batches_module.TextBatches.next
    monkeypatch.setattr(batches_module.TextBatches, "next",
                        lambda self: drawn.append(real_next(self)) or drawn[-1])
    steps, warmup = 6, 2
    assert main(args(data, start, init="pretrained", max_steps=steps, accumulate_gradients=2,
                     optimizer=optimizer, weight_decay=wd, lr_schedule="cosine",
                     warmup_steps=warmup, grad_clip=clip, noise=0.05,
                     learning_rate=peak)) == 0
    ours = losses(tmp_path / "checkpoint" / "run1")
    assert len(drawn) == 2 * steps

    from gpt2.io.model_dir import load_model

    export_huggingface(load_model(start), tmp_path / "hf", encoder_dir=start)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").train()
    params = list(hf.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8) \
        if optimizer == "adamw" else torch.optim.SGD(groups, lr=peak)
    theirs = []
    for step in range(1, steps + 1):
        if step <= warmup:
            lr = peak * step / warmup
        else:  # cosine from the peak down to 10% of it at the last step
            progress = (step - warmup) / (steps - warmup)
            lr = 0.1 * peak + 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 * peak
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        micro = []
        for batch in drawn[2 * step - 2:2 * step]:
            loss = hf(input_ids=batch.inputs, labels=batch.targets).loss
            (loss / 2).backward()
            micro.append(loss.item())
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        theirs.append(sum(micro) / 2)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_losses_match_golden_file(tmp_path):
    """A regression guard for what no other implementation reproduces: dropout masks (and the
    input noise) drawn from the run's seeded streams, in the same order every time. The
    arithmetic itself is compared with transformers above."""
    expected = json.loads(GOLDEN.read_text())["losses"]
    got = golden_run(tmp_path)
    assert len(got) == len(expected) == GOLDEN_FLAGS["max_steps"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=GOLDEN_TOL)


def test_losses_are_read_when_printed_not_after_every_step(tmp_path, data, model_dir,
                                                           monkeypatch):
    """A step leaves its loss on the device (reading it makes a GPU wait): the loop reads the
    losses of several steps at once, when it prints (or measures, samples, saves, stops), and
    nothing in a step reads a tensor. The numbers are the same as reading after every step,
    and so are the weights."""
    from gpt2.training import loop

    reads, inside, stepping = [], [], [False]
    settle, step = loop.Unsettled.settle, loop.Trainer.train_step
    monkeypatch.setattr(loop.Unsettled, "settle",
                        lambda self: reads.append(len(self.steps)) or settle(self))

    def watched(self):
        stepping[0] = True
        try:
            return step(self)
        finally:
            stepping[0] = False

    monkeypatch.setattr(loop.Trainer, "train_step", watched)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name, **k: (
            inside.append(_n) if stepping[0] else None, _r(t, *a, **k))[1])
    flags = dict(max_steps=8, optimizer="adamw", grad_clip=1.0, accumulate_gradients=2)
    assert main(args(data, model_dir, run_name="every4", print_every=4, **flags)) == 0
    assert [n for n in reads if n] == [4, 4] and inside == []
    assert main(args(data, model_dir, run_name="every1", print_every=1, **flags)) == 0
    timed = ("tokens_per_sec", "elapsed")  # (times: equal only in their keys and sign)
    runs = [metrics(tmp_path / "checkpoint" / name) for name in ("every4", "every1")]
    assert all(m[k] > 0 for run in runs for m in run for k in timed)
    a, b = ([{k: v for k, v in m.items() if k not in timed} for m in run] for run in runs)
    assert a == b and [sorted(m) for m in runs[0]] == [sorted(m) for m in runs[1]]
    a, b = weights(tmp_path / "checkpoint" / "every4"), weights(tmp_path / "checkpoint" / "every1")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_non_finite_loss_skips_its_update_without_stopping(tmp_path, data, model_dir,
                                                             monkeypatch, capsys, optimizer):
    """Step 3's loss is NaN: its update is skipped (on the device for the fused AdamW, on the
    host for Adafactor), the optimizer's own step count does not move, a warning says so,
    the validation due at that step still runs, and the run goes on with finite weights."""
    import gpt2.model

    calls, real = [0], gpt2.model.token_loss

    def nan_at_step_3(*a, **k):
        loss = real(*a, **k)
        if torch.is_grad_enabled():  # (a training step, not the validation)
            calls[0] += 1
            return loss * float("nan") if calls[0] == 3 else loss
        return loss

    monkeypatch.setattr(gpt2.model, "token_loss", nan_at_step_3)
    assert main(args(data, model_dir, max_steps=5, optimizer=optimizer, print_every=1,
                     save_every=5, val_every=3, val_batch_count=1)) == 0
    assert "warning: non-finite loss at step 3; its update was skipped" in capsys.readouterr().out
    run = tmp_path / "checkpoint" / "run1"
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 4, 5]
    assert [m["step"] for m in metrics(run) if "val_loss" in m] == [0, 3, 5]
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    from safetensors.torch import load_file

    steps = {v.item() for k, v in load_file(str(newest(run) / "optimizer.safetensors")).items()
             if k.endswith("/step")}
    assert steps in ({4.0}, set())  # (Adafactor keeps its count elsewhere)


def test_loss_falls_on_real_text(tmp_path, model_dir):
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)[:12])
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    (tmp_path / "corpus" / "valid").mkdir()
    (tmp_path / "corpus" / "train" / "a.txt").write_text(text[:-10000])
    (tmp_path / "corpus" / "valid" / "b.txt").write_text(text[-10000:])
    code = main(args(tmp_path / "corpus", model_dir, max_steps=40, batch_size=8, val_every=20,
                     val_batch_count=4, val_batch_size=8))
    assert code == 0
    val = [(m["step"], m["val_loss"]) for m in metrics(tmp_path / "checkpoint/run1")
           if "val_loss" in m]
    assert [s for s, _ in val] == [0, 20, 40]
    assert val[0][1] > math.log(257) - 0.3  # an untrained model is near uniform
    assert val[0][1] > val[1][1] > val[2][1] and val[2][1] < val[0][1] - 1.0, val


RESUME_FLAGS = dict(accumulate_gradients=2, dropout=0.1, noise=0.1, optimizer="adamw",
                    weight_decay=0.1, warmup_steps=3, grad_clip=1.0)


def test_resume_equals_uninterrupted(tmp_path, data, model_dir):
    extra = ["--memory_saving_gradients", "--memory_saving_blocks", "0"]
    assert main(args(data, model_dir, *extra, run_name="whole", max_steps=10,
                     **RESUME_FLAGS)) == 0
    assert main(args(data, model_dir, *extra, run_name="split", max_steps=4,
                     **RESUME_FLAGS)) == 0
    assert (tmp_path / "checkpoint/split/counter").read_text() == "4\n"
    assert main(args(data, model_dir, *extra, run_name="split", max_steps=10,
                     **RESUME_FLAGS)) == 0
    whole, split = tmp_path / "checkpoint/whole", tmp_path / "checkpoint/split"
    assert [m["step"] for m in metrics(split)] == list(range(1, 11))
    assert losses(split) == losses(whole)  # bitwise
    w1, w2 = weights(whole), weights(split)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert metrics(split)[-1]["tokens"] == 10 * 2 * 2 * 32


def test_resume_outlives_the_pruned_checkpoint_it_started_from(tmp_path, data, model_dir):
    # The checkpoint a run resumes from is pruned after --keep_checkpoints more saves; later
    # saves must not need it (they copied its encoder files and failed once it was gone).
    flags = dict(save_every=1, keep_checkpoints=2)
    assert main(args(data, model_dir, max_steps=3, **flags)) == 0
    assert main(args(data, model_dir, max_steps=10, **flags)) == 0
    run_dir = tmp_path / "checkpoint/run1"
    assert sorted(p.name for p in run_dir.glob("model-*")) == ["model-10", "model-9"]
    assert (run_dir / "counter").read_text() == "10\n"
    for path in (newest(run_dir), run_dir / "model-10"):
        assert (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file()
        assert weights(path).keys() == weights(run_dir / "model-9").keys()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_completed_steps_and_resumes(tmp_path, data, model_dir, sig):
    flags = dict(run_name="sig", **RESUME_FLAGS)
    cmd = [sys.executable, "-m", "gpt2", "train",
           *args(data, model_dir, max_steps=100000, print_every=1, **flags)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with bounded.Proc(cmd, env=env) as proc:
        proc.wait_for(lambda line: line.startswith("[3 |"), timeout=120)
        proc.signal(sig)
        done_proc = proc.finish(timeout=120)
    out, err = done_proc.stdout, done_proc.stderr
    assert done_proc.returncode == 0, err
    assert "Traceback" not in err
    done = metrics(tmp_path / "checkpoint/sig")[-1]["step"]
    assert done >= 3
    assert (tmp_path / "checkpoint/sig/counter").read_text() == f"{done}\n"
    assert (tmp_path / f"checkpoint/sig/model-{done}/model.safetensors").exists()
    assert f"Saving checkpoint/sig/model-{done}" in out

    # Resuming continues exactly where an uninterrupted run would be.
    total = done + 3
    assert main(args(data, model_dir, max_steps=total, **flags)) == 0
    assert main(args(data, model_dir, max_steps=total, **{**flags, "run_name": "ref"})) == 0
    np.testing.assert_allclose(losses(tmp_path / "checkpoint/sig"),
                               losses(tmp_path / "checkpoint/ref"), rtol=0, atol=1e-6)


def test_checkpoint_is_a_model_directory_that_samples(tmp_path, data, model_dir, capsys):
    from gpt2.io.model_dir import load_model
    from gpt2.sampling import sample_sequence
    from gpt2.commands.sample import unconditional_main

    assert main(args(data, model_dir, max_steps=4, save_every=2, keep_checkpoints=1,
                     sample_every=4, sample_num=3, sample_length=8)) == 0
    run_dir = tmp_path / "checkpoint/run1"
    assert sorted(p.name for p in run_dir.glob("model-*")) == ["model-4"]  # keep 1
    for path in (run_dir, run_dir / "model-4"):
        model = load_model(path)
        out = sample_sequence(model, 5, torch.tensor([[256]]), top_k=10, seed=0)
        assert out.shape == (1, 6)
    state = json.loads((newest(run_dir) / "trainer_state.json").read_text())
    assert state["step"] == 4
    sample_file = (tmp_path / "samples/run1/samples-4").read_text()
    assert [line for line in sample_file.splitlines() if line.startswith("========")] == \
        [f"======== SAMPLE {i} ========" for i in (1, 2, 3)]
    capsys.readouterr()
    assert unconditional_main(["--model_dir", str(run_dir), "--nsamples", "1", "--length", "5",
                               "--seed", "0"]) == 0
    assert "SAMPLE 1" in capsys.readouterr().out


def test_log_lines_and_metrics(tmp_path, data, model_dir, capsys):
    assert main(args(data, model_dir, max_steps=3, print_every=1, val_every=2,
                     val_batch_count=2)) == 0
    out = capsys.readouterr().out
    assert "Loading dataset..." in out and "Training..." in out
    assert any(line.startswith("[2 | ") and " loss=" in line and " avg=" in line
               for line in out.splitlines())
    assert "Calculating validation loss..." in out
    rows = metrics(tmp_path / "checkpoint/run1")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[1]) == {"step", "loss", "avg", "lr", "tokens_per_sec", "elapsed", "tokens"}
    assert "val_loss" in rows[2] and "val_loss" not in rows[1]
    assert "val_loss" in rows[3]  # and at --max_steps: the final model's
    # avg is the original's bias-corrected moving average
    a = b = 0.0
    for r in rows[1:]:
        a, b = 0.99 * a + r["loss"], 0.99 * b + 1
        assert r["avg"] == pytest.approx(a / b)


def test_accumulated_gradients_are_averaged(tmp_path, data, model_dir):
    """One SGD update over 2 micro-batches equals a hand-computed step on their mean loss."""
    from gpt2.data.dataset import load_dataset
    from gpt2.data.sampler import Sampler
    from gpt2.tokenizer import load_encoder

    lr = 0.5
    assert main(args(data, model_dir, max_steps=1, batch_size=1, accumulate_gradients=2,
                     optimizer="sgd", learning_rate=lr, seed=11)) == 0
    torch.manual_seed(11)
    model = GPT(GPTConfig(n_vocab=257, **TINY))
    chunks = load_dataset(data, load_encoder(model_dir), quiet=True)
    sampler = Sampler(chunks, seed=11)
    batches = [torch.from_numpy(sampler.sample_batch(1, 32)) for _ in range(2)]
    loss = sum(lm_loss(model(b), b) for b in batches) / 2
    loss.backward()
    with torch.no_grad():
        expected = {n: p - lr * p.grad for n, p in model.named_parameters()}
    got = weights(tmp_path / "checkpoint/run1")
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_only_train_transformer_layers(tmp_path, data, model_dir):
    assert main(args(data, model_dir, "--only_train_transformer_layers", max_steps=1,
                     save_every=1, run_name="a")) == 0
    assert main(args(data, model_dir, "--only_train_transformer_layers", max_steps=3,
                     run_name="a")) == 0
    before, after = weights(tmp_path / "checkpoint/a/model-1"), weights(tmp_path / "checkpoint/a")
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith("h.")), name


def test_restore_from_directory_or_file(tmp_path, data, model_dir):
    assert main(args(data, model_dir, max_steps=2, run_name="base")) == 0
    base = tmp_path / "checkpoint/base"
    # A checkpoint directory resumes its step count, optimizer state and RNGs.
    assert main(args(data, model_dir, "--restore_from", str(base / "model-2"),
                     max_steps=3, run_name="from_dir", init="pretrained")) == 0
    assert metrics(tmp_path / "checkpoint/from_dir")[0]["step"] == 3  # a checkpoint resumes
    # A file inside a checkpoint names that checkpoint.
    assert main(args(data, model_dir, "--restore_from", str(base / "model.safetensors"),
                     max_steps=4, run_name="from_file", init="pretrained")) == 0
    assert [m["step"] for m in metrics(tmp_path / "checkpoint/from_file")] == [3, 4]
    # A plain model directory without trainer state starts a new count.
    from gpt2.io.model_dir import load_model, save_model

    save_model(load_model(base), tmp_path / "plain", encoder_dir=model_dir)
    assert main(args(data, model_dir, "--restore_from", str(tmp_path / "plain"),
                     max_steps=1, run_name="from_plain", init="pretrained")) == 0
    assert [m["step"] for m in metrics(tmp_path / "checkpoint/from_plain")] == [1]


def test_fresh_needs_overwrite_then_replaces_old_checkpoints(tmp_path, data, model_dir, capsys):
    assert main(args(data, model_dir, max_steps=3, save_every=1)) == 0
    run_dir = tmp_path / "checkpoint/run1"
    before = snapshot(run_dir)
    assert run(main, args(data, model_dir, "--restore_from", "fresh", max_steps=1)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    assert main(args(data, model_dir, "--restore_from", "fresh", "--overwrite",
                     max_steps=1)) == 0
    assert sorted(p.name for p in run_dir.glob("model-*")) == ["model-1"]
    assert (run_dir / "counter").read_text() == "1\n"


# --- bad input: one line, exit 1, the existing checkpoint untouched ---------------------------

def _bad_inputs(tmp: Path, data: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.bin.txt").write_bytes(bytes(range(256)) * 8)
    (tmp / "short.txt").write_text("too short\n")
    bad_json = make_model_dir(tmp / "bad_json")
    (bad_json / "hparams.json").write_text("{not json")
    bad_values = make_model_dir(tmp / "bad_values", n_head=5)
    # Weights saved for n_embd 32, hparams saying 64.
    from gpt2.io.model_dir import save_model

    mismatched = tmp / "mismatched"
    save_model(GPT(GPTConfig(n_vocab=257, **TINY)), mismatched, encoder_dir=model_dir)
    (mismatched / "hparams.json").write_text(json.dumps({"n_vocab": 257, **TINY, "n_embd": 64}))
    fresh = ["--restore_from", "fresh", "--overwrite"]
    no_model = args(data, model_dir, *fresh, init="pretrained")
    i = no_model.index("--model_dir")
    del no_model[i:i + 2]
    no_model += ["--models_dir", str(tmp / "models")]
    return {
        "missing dataset": (args(tmp / "nope.txt", model_dir), "nope.txt"),
        "empty dataset": (args(tmp / "empty.txt", model_dir), "no text"),
        "binary dataset": (args(tmp / "binary.bin.txt", model_dir), "binary.bin.txt"),
        "too-short dataset": (args(tmp / "short.txt", model_dir), "short.txt"),
        "missing model": (no_model, "download_model.py 124M"),
        "no weights without --init fresh": (args(data, model_dir, *fresh, init="pretrained"),
                                            "--init fresh"),
        "malformed hparams": (args(data, bad_json, *fresh), "hparams.json"),
        "invalid hparams": (args(data, bad_values, *fresh), "hparams.json"),
        "mismatched hparams": (args(data, mismatched, *fresh, init="pretrained"), "shape"),
        "negative learning rate": (args(data, model_dir, learning_rate=-1), "--learning_rate"),
        "bad config file": (args(data, model_dir, "--config", str(bad_json / "hparams.json")),
                            "--config"),
        "bad blocks": (args(data, model_dir, "--memory_saving_gradients",
                            "--memory_saving_blocks", "7"), "--memory_saving_blocks"),
    }


def test_bad_inputs_fail_cleanly_and_keep_the_checkpoint(tmp_path, data, model_dir, capsys):
    assert main(args(data, model_dir, max_steps=2)) == 0
    run_dir = tmp_path / "checkpoint/run1"
    before = snapshot(run_dir)
    capsys.readouterr()
    for name, (argv, must_mention) in _bad_inputs(tmp_path, data, model_dir).items():
        code = run(main, argv + ["--run_name", "run1"])
        err = capsys.readouterr().err.strip()
        assert code == 1, name
        # Progress bars may precede it on stderr; the error itself is one last line.
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and err.count("error: ") == 1, (name, err)
        assert "Traceback" not in err
        assert must_mention in last, (name, last)
        assert snapshot(run_dir) == before, name


def test_truncated_checkpoint_fails_cleanly(tmp_path, data, model_dir, capsys):
    assert main(args(data, model_dir, max_steps=2)) == 0
    weights_file = tmp_path / "checkpoint/run1/model-2/model.safetensors"
    with open(weights_file, "r+b") as f:
        f.truncate(weights_file.stat().st_size // 2)
    before = snapshot(tmp_path / "checkpoint")
    capsys.readouterr()
    assert run(main, args(data, model_dir, max_steps=4)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "model.safetensors" in err
    assert snapshot(tmp_path / "checkpoint") == before


def test_cli_error_has_no_traceback(tmp_path, model_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = bounded.run([sys.executable, str(REPO / "train.py"), "--dataset", "missing.txt",
                        "--model_dir", str(model_dir)], env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_tensorboard_logs_the_metrics_and_a_resume_rewrites_them(tmp_path, data, model_dir):
    # The reader TensorBoard's own server uses (scalars and text are both tensors there).
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from test_train_parts import write_eval_files

    hellaswag, _ = write_eval_files(tmp_path)
    flags = dict(max_steps=4, save_every=2, val_every=2, val_batch_count=2, sample_every=4,
                 sample_length=6, eval_every=4, eval_tasks=f"hellaswag={hellaswag}")
    assert main(args(data, model_dir, "--tensorboard", **flags)) == 0
    run_dir = tmp_path / "checkpoint/run1"
    # A crash after step 4 was logged but before it was saved: the run resumes from step 2 and
    # logs steps 3 and 4 again, which must replace the first ones, not add to them.
    import shutil
    shutil.rmtree(run_dir / "model-4")
    (run_dir / "counter").write_text("2\n")
    assert main(args(data, model_dir, "--tensorboard", **{**flags, "max_steps": 5})) == 0

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    rows = metrics(run_dir)
    for tag, key in (("loss/train", "loss"), ("loss/val", "val_loss"), ("lr", "lr"),
                     ("throughput/tokens_per_sec", "tokens_per_sec"),
                     ("eval/hellaswag_acc_norm", "hellaswag_acc_norm")):
        got = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    assert [e.step for e in events.Tensors("loss/val")] == [0, 2, 4, 5]  # 5: --max_steps
    assert [e.step for e in events.Tensors("eval/hellaswag_acc")] == [0, 4, 5]
    assert "eval/hellaswag_examples" not in events.Tags()["tensors"]
    [sample] = events.Tensors("samples/1/text_summary")
    assert sample.step == 4
    text = make_ndarray(sample.tensor_proto).item().decode()
    assert text == "```\n" + (tmp_path / "samples/run1/samples-4").read_text().split(
        "========\n", 1)[1].rstrip("\n") + "\n```"


def test_tensorboard_missing_is_one_line(tmp_path, data, model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    assert run(main, args(data, model_dir, "--tensorboard", max_steps=1)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tensorboard needs") and "\n" not in err
    assert not (tmp_path / "checkpoint").exists()


def test_chunked_loss_trains_like_the_plain_loss(tmp_path, data, model_dir, monkeypatch):
    import gpt2.model

    flags = dict(max_steps=6, accumulate_gradients=2, optimizer="adamw", grad_clip=1.0,
                 val_every=3, val_batch_count=2)
    assert main(args(data, model_dir, run_name="plain", loss_chunk=0, **flags)) == 0
    chunks, real = [], gpt2.model.token_loss
    monkeypatch.setattr(gpt2.model, "token_loss",
                        lambda *a, chunk, **k: chunks.append(chunk) or real(*a, chunk=chunk, **k))
    assert main(args(data, model_dir, run_name="chunked", loss_chunk=7, **flags)) == 0
    assert chunks and set(chunks) == {7}  # every training and validation loss went through it
    plain, chunked = metrics(tmp_path / "checkpoint/plain"), metrics(tmp_path / "checkpoint/chunked")
    for key in ("loss", "val_loss"):
        a = [r[key] for r in plain if key in r]
        b = [r[key] for r in chunked if key in r]
        assert len(a) == len(b) > 1
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    w1 = weights(tmp_path / "checkpoint/plain")
    w2 = weights(tmp_path / "checkpoint/chunked")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


# --- pieces ------------------------------------------------------------------------------------

def test_noise_replaces_inputs_with_uniform_ids():
    from gpt2.data.sampler import add_noise

    clean = np.zeros((50, 200), dtype=np.int64)
    noisy = add_noise(clean, 0.3, np.random.default_rng(0), 257)
    assert noisy.shape == clean.shape and clean.max() == 0  # the input array is not modified
    changed = noisy != 0
    assert changed.mean() == pytest.approx(0.3 * 256 / 257, abs=0.02)
    assert noisy.max() < 257 and len(np.unique(noisy[changed])) > 200


def test_config_file_and_command_line_precedence(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset: a.txt\nbatch_size: 4\nmemory_saving_gradients: "
                                       "true\ncompile: false\nlearning_rate: '1e-4'\n")
    cfg = parse_config(["--config", "run.yaml", "--batch_size", "2"])
    assert (cfg.dataset, cfg.batch_size, cfg.memory_saving_gradients, cfg.compile,
            cfg.learning_rate) == ("a.txt", 2, True, False, 1e-4)
    (tmp_path / "run.json").write_text(json.dumps({"optimizer": "lion"}))
    with pytest.raises(UserError, match="optimizer"):
        parse_config(["--config", "run.json"])
    (tmp_path / "typo.json").write_text(json.dumps({"batchsize": 2}))
    with pytest.raises(UserError, match="batchsize"):
        parse_config(["--config", "typo.json"])


def test_memory_check_refuses_with_advice(tmp_path, data, monkeypatch, capsys):
    big = make_model_dir(tmp_path / "big", n_ctx=1024, n_embd=768, n_head=12, n_layer=12,
                         n_vocab=50257)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 * memory.GB)
    assert run(main, args(data, big, batch_size=8)) == 1
    err = capsys.readouterr().err
    assert "GB" in err and "--memory_saving_gradients" in err and "--batch_size 1" in err


def test_activation_checkpointing_gives_same_gradients(tiny_config):
    torch.manual_seed(0)
    a = GPT(tiny_config)
    b = GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    parallelize.apply_activation_checkpointing(b, parallelize.parse_blocks("all", tiny_config.n_layer))
    x = torch.randint(0, tiny_config.n_vocab, (2, 16))
    for m in (a, b):
        lm_loss(m(x), x).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    assert list(a.state_dict()) == list(b.state_dict())  # names unchanged
    assert all(type(block) is parallelize.CheckpointedBlock for block in b.h)
    # the checkpointed blocks store less for backward: one input per block, not its insides
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        b(x, targets=x)
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t.numel()) or t,
                                                  lambda t: t):
        a(x, targets=x)
    assert sum(saved) < sum(plain) / 2


def test_parse_blocks():
    assert parallelize.parse_blocks("all", 4) == [0, 1, 2, 3]
    assert parallelize.parse_blocks("every:2", 5) == [0, 2, 4]
    assert parallelize.parse_blocks("3, 0", 4) == [0, 3]
    for bad in ("4", "every:0", "x", ""):
        with pytest.raises(ValueError):
            parallelize.parse_blocks(bad, 4)


def test_lr_schedule():
    assert optim.lr_at(1, 1.0, "constant", warmup_steps=4) == 0.25
    assert optim.lr_at(10, 1.0, "constant", warmup_steps=4) == 1.0
    lrs = [optim.lr_at(s, 1.0, "cosine", 10, 110) for s in range(1, 111)]
    assert lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[59] == pytest.approx(0.55)  # half way: midpoint of 1.0 and the 0.1 floor
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_state_round_trip(tiny_config, name):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.n_vocab, (2, 8))

    def step(m, opt):
        opt.zero_grad()
        lm_loss(m(x), x).backward()
        opt.step()

    opt = optim.build_optimizer(model, name, 1e-2, weight_decay=0.1)
    step(model, opt)
    tensors, meta = optim.optimizer_state(opt, model)
    json.dumps(meta)
    clone = GPT(tiny_config)
    clone.load_state_dict(model.state_dict())
    opt2 = optim.build_optimizer(clone, name, 1e-2, weight_decay=0.1)
    assert optim.load_optimizer_state(opt2, clone, tensors, meta) is None
    step(model, opt)
    step(clone, opt2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    other = optim.build_optimizer(clone, "sgd" if name != "sgd" else "adam", 1e-2)
    assert optim.load_optimizer_state(other, clone, tensors, meta) is not None
    assert not other.state  # a refused state changes nothing
    fresh = optim.build_optimizer(clone, name, 1e-2)
    assert optim.optimizer_state(fresh, clone)[0] == {} and not fresh.state  # no step taken


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit("usage: python tests/test_train.py --update-golden")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GPT2_CACHE"] = str(Path(tmp) / "cache")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            result = golden_run(Path(tmp))
        finally:
            os.chdir(cwd)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "command": "python tests/test_train.py --update-golden",
        "torch": torch.__version__, "tolerance": GOLDEN_TOL, "flags": GOLDEN_FLAGS,
        "losses": result}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {result}")


def test_lora_trains_adapters_saves_a_plain_model_and_resumes_exactly(tmp_path, data, model_dir):
    from gpt2.io.model_dir import load_config, load_model, save_model
    from gpt2.lora import read_lora_config

    torch.manual_seed(0)  # a "pretrained" base to fine-tune: weights + the tiny encoder
    model_dir = save_model(GPT(load_config(model_dir)), tmp_path / "base", encoder_dir=model_dir)
    lora = ["--lora_rank", "4", "--lora_targets", "c_attn,c_proj"]
    for run_name, steps in (("whole", 6), ("split", 3), ("split", 6)):
        assert main(args(data, model_dir, *lora, init="pretrained", run_name=run_name,
                         max_steps=steps, **RESUME_FLAGS)) == 0
    whole, split = tmp_path / "checkpoint/whole", tmp_path / "checkpoint/split"
    assert losses(split) == losses(whole)  # bitwise, across the resume
    w1, w2 = weights(whole), weights(split)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    # The run directory is a plain model directory (merged weights) plus the small adapter.
    assert read_lora_config(newest(whole) / "adapter")["rank"] == 4
    assert (newest(whole) / "adapter/adapter.safetensors").stat().st_size * 5 < \
        (newest(whole) / "model.safetensors").stat().st_size
    base, merged = weights(model_dir), load_model(whole).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".attn.c_attn.weight" in k or "c_proj.weight" in k for k in changed)


def test_lora_refuses_fsdp_and_fresh(tmp_path, data, model_dir, capsys):
    for extra in (["--fsdp"], ["--init", "fresh"]):
        assert run(main, args(data, model_dir, "--lora_rank", "2", *extra)) == 1
        assert "--lora_rank cannot be combined" in capsys.readouterr().err


def test_evals_during_training_go_to_metrics_and_the_plot(tmp_path, data, model_dir, capsys):
    """--eval_every: the benchmarks at step 0 and every N steps, in the log, metrics.jsonl and
    gpt2 plot's second panel; the last equal `gpt2 evaluate --task` on the saved model."""
    from test_train_parts import write_eval_files

    from gpt2.cli import main as cli

    pytest.importorskip("matplotlib")
    hellaswag, lambada = write_eval_files(tmp_path)
    assert main(args(data, model_dir, max_steps=4, eval_every=2, eval_limit=5,
                     eval_tasks=f"hellaswag={hellaswag},lambada={lambada}")) == 0
    out = capsys.readouterr().out
    assert "Scoring hellaswag (5 examples)..." in out
    assert any(line.startswith("[2 | ") and "hellaswag_acc_norm = " in line
               for line in out.splitlines())
    rows = metrics(tmp_path / "checkpoint/run1")
    keys = {"hellaswag_acc", "hellaswag_acc_norm", "lambada_acc", "lambada_perplexity"}
    assert [r["step"] for r in rows if keys <= set(r)] == [0, 2, 4]
    assert not keys & set(rows[1])
    assert cli(["evaluate", str(tmp_path / "checkpoint/run1"), "--task", "lambada", "--data",
                str(lambada), "--limit", "5", "--out", str(tmp_path / "l.json")]) == 0
    assert json.loads((tmp_path / "l.json").read_text())["perplexity"] == pytest.approx(
        rows[-1]["lambada_perplexity"], rel=1e-5)
    assert cli(["plot", str(tmp_path / "checkpoint/run1"), "--out", str(tmp_path / "p.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[0] > 1500  # two panels side by side

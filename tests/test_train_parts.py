"""The training run's parts, each built and checked on its own (what Trainer.setup composes):
where a run starts, the model wrapped for it, its batches, its optimization, its validation.

A new kind of data (examples with a loss mask) or an eval during training is one more part
like these, tested the same way, instead of more Trainer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2.errors import UserError
from gpt2.training import optim
from gpt2.training.batches import TextBatches
from gpt2.training.build import build_training_model
from gpt2.training.config import parse_config
from gpt2.training.distributed import DistInfo
from gpt2.training.evaluation import Validation, training_samples
from gpt2.training.objectives import LanguageModelling
from gpt2.training.parallelize import CheckpointedBlock
from gpt2.training.run_dir import RunDir
from gpt2.training.start import plan_start
from gpt2.tokenizer.files import load_encoder
from helpers import lm_loss
from test_train import _isolated, args, data, main, model_dir  # noqa: F401

ONE = DistInfo()  # one process on the CPU


def config(data, model_dir, *extra, **flags):
    cfg = parse_config(args(data, model_dir, *extra, **flags))
    cfg.validate()
    return cfg


def start_of(cfg):
    return plan_start(cfg, RunDir(cfg.checkpoint_dir, cfg.samples_dir, cfg.run_name), ONE)


class Stop:
    def __init__(self, after: int | None = None):
        self.after, self.calls = after, 0

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.after is not None and self.calls > self.after


def test_start_of_a_new_run_and_of_a_resumed_one(data, model_dir):
    cfg = config(data, model_dir, dropout=0.25, seed=11)
    start = start_of(cfg)
    assert start.point.model_dir == model_dir and start.point.fresh_init and not start.resume
    assert start.config.dropout == 0.25 and start.seed == 11
    assert start.sample_length == start.config.n_ctx - 1
    with pytest.raises(UserError, match="--sample_length 99 is longer than the model's n_ctx"):
        start_of(config(data, model_dir, sample_length=99))
    assert main(args(data, model_dir, max_steps=2, seed=5)) == 0
    resumed = start_of(config(data, model_dir, seed=123))  # --restore_from latest
    assert resumed.resume and resumed.state["step"] == 2
    assert resumed.seed == 5  # a resumed run keeps its own seed
    assert resumed.point.model_dir.name == "model-2"


def test_the_model_part_checks_memory_builds_and_wraps(data, model_dir):
    lines = []
    cfg = config(data, model_dir, "--memory_saving_gradients", memory_saving_blocks="0")
    model = build_training_model(cfg, start_of(cfg), ONE, lines.append)
    assert lines[0].startswith("Memory estimate (cpu, fp32, batch 2 x 32)")
    assert model.precision == "fp32" and not model.compiled and model.checkpointed == [0]
    gpt = model.parallel.model
    assert type(gpt.h[0]) is CheckpointedBlock and type(gpt.h[1]) is not CheckpointedBlock
    assert model.parallel.train_model is gpt and gpt.training
    assert model.describe(cfg, ONE)[0].startswith("Model: ")
    with pytest.raises(UserError, match="--memory_saving_blocks"):
        build_training_model(config(data, model_dir, "--memory_saving_gradients",
                                    memory_saving_blocks="9"), start_of(cfg), ONE, print)


def test_text_batches_draw_noisy_windows_and_resume_exactly(data, model_dir):
    cfg = config(data, model_dir, noise=0.5, batch_size=3)
    start = start_of(cfg)
    encoder = load_encoder(model_dir)
    batches = TextBatches.load(cfg, encoder, start, ONE, lambda *a: None)
    batch = batches.next()
    inputs, targets = batch.inputs, batch.targets
    assert batch.segments is None  # windows of text: one sequence per row
    assert inputs.shape == targets.shape == (3, 32) and batches.tokens == 3 * 32
    text = data.read_text()
    assert all(encoder.decode(row.tolist()) in text for row in targets)  # whole windows
    changed = (inputs != targets).float().mean().item()
    assert 0.3 < changed < 0.6  # noise 0.5, and a random id may equal the original
    # a copy restored from the state draws exactly what the original draws next
    state, noise = batches.sampler.state_dict(), batches.noise_rng.bit_generator.state
    again = TextBatches.load(cfg, encoder, start, ONE, lambda *a: None)
    again.sampler.load_state_dict(state)
    again.noise_rng.bit_generator.state = noise
    a, b = batches.next(), again.next()
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_optimization_follows_the_schedule_clips_and_skips(data, model_dir):
    cfg = config(data, model_dir, optimizer="sgd", learning_rate=0.5, grad_clip=1e-3,
                 warmup_steps=4, max_steps=10)
    model = torch.nn.Linear(3, 2)
    opt = optim.Optimization(cfg, model, ONE, "fp32")
    assert opt.start_update(2) == pytest.approx(0.25)  # warm-up: 2/4 of the rate
    before = [p.detach().clone() for p in model.parameters()]
    opt.backward(model(torch.ones(1, 3)).sum() * 1e6)
    opt.skip_update()  # a non-finite loss: nothing changes, gradients dropped
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.start_update(5)
    opt.backward(model(torch.ones(1, 3)).sum() * 1e6)
    opt.finish_update()  # SGD step of the clipped gradient: norm 1e-3 x lr 0.5
    moved = torch.cat([(p - a).flatten() for a, p in zip(before, model.parameters())])
    assert moved.norm().item() == pytest.approx(0.5 * 1e-3, rel=1e-4)


def test_validation_is_the_mean_batch_loss_and_stops_within_a_pass(data, model_dir):
    cfg = config(data, model_dir, val_every=1, val_batch_count=5)
    start = start_of(cfg)
    model = build_training_model(cfg, start, ONE, lambda *a: None)
    batches = TextBatches.load(cfg, load_encoder(model_dir), start, ONE, lambda *a: None)
    validation = Validation(batches.val_batches, model, LanguageModelling(), ONE,
                            lambda *a: None)
    gpt = model.parallel.model
    with torch.no_grad():
        gpt.eval()
        expected = np.mean([lm_loss(gpt(b.inputs), b.targets).item()
                            for b in batches.val_batches])
        gpt.train()
    assert validation.run(Stop()) == {"val_loss": pytest.approx(expected, abs=1e-5)}
    assert gpt.training  # back in training mode
    stop = Stop(after=2)
    assert validation.run(stop) is None and stop.calls == 3 and gpt.training
    texts = training_samples(model, load_encoder(model_dir), cfg, start.seed, 0, 5, ONE)
    assert len(texts) == 1 and len(texts[0]) <= 5 * 4  # byte-level tokens: up to 4 bytes each


def write_eval_files(tmp_path) -> tuple:
    """Short HellaSwag and LAMBADA records (the tiny model's context is 32 byte tokens)."""
    import json

    hellaswag, lambada = tmp_path / "hs.jsonl", tmp_path / "lambada.jsonl"
    with open(hellaswag, "w") as f:
        for i in range(7):
            f.write(json.dumps({"ctx": f"the city {i} was", "label": i % 4,
                                "endings": ["new.", "in one state.", "first", "the school"]})
                    + "\n")
    with open(lambada, "w") as f:
        for i in range(9):
            f.write(json.dumps({"text": f"it was the {['new', 'first', 'one'][i % 3]} city"})
                    + "\n")
    return hellaswag, lambada


def test_task_evals_score_as_the_tasks_do_and_stop_within_a_pass(tmp_path, data, model_dir):
    from gpt2.tasks import read_hellaswag, read_lambada, score
    from gpt2.training.evaluation import TaskEvals

    hellaswag, lambada = write_eval_files(tmp_path)
    cfg = config(data, model_dir, eval_every=1, eval_limit=6, batch_size=4,
                 eval_tasks=f"hellaswag={hellaswag}, lambada={lambada}")
    start = start_of(cfg)
    model = build_training_model(cfg, start, ONE, lambda *a: None)
    encoder = load_encoder(model_dir)
    evals = TaskEvals(cfg, model, encoder, ONE, lambda *a: None)
    gpt = model.parallel.model
    scores = evals.run(Stop())
    assert gpt.training  # back in training mode
    gpt.eval()
    hs = score("hellaswag", gpt, encoder, read_hellaswag(hellaswag, 6))
    lb = score("lambada", gpt, encoder, read_lambada(lambada, 6))
    gpt.train()
    assert scores == pytest.approx({"hellaswag_acc": hs["acc"], "hellaswag_acc_norm":
                                    hs["acc_norm"], "lambada_acc": lb["acc"],
                                    "lambada_perplexity": lb["perplexity"],
                                    "hellaswag_examples": 6, "lambada_examples": 6}, rel=1e-6)
    assert hs["examples"] == lb["examples"] == 6
    stop = Stop(after=1)  # Ctrl-C after the first batch: no scores, training mode again
    assert evals.run(stop) is None and gpt.training and stop.calls == 2


@pytest.mark.parametrize("tasks, says", [
    ("wikitext2", "'wikitext2' is not one of hellaswag, lambada"),
    ("lambada", "lambada: no data/lambada_test.jsonl; run `gpt2 download --dataset lambada`"),
    (" , ", "name at least one task"),
])
def test_eval_tasks_are_checked_before_anything_loads(data, model_dir, tasks, says):
    with pytest.raises(UserError, match="--eval_tasks: ") as e:
        config(data, model_dir, eval_every=5, eval_tasks=tasks)
    assert says in str(e.value)

"""./quickstart.sh's job end to end on a few steps: `gpt2 quickstart` writes the corpus, trains
the tokenizer and the model, and samples from the run directory, which every reader (the model,
the tokenizer, the sample scripts) resolves to the checkpoint its ``counter`` names."""

from __future__ import annotations

import json
import io
import os
import sys
from pathlib import Path

import pytest

import bounded
from gpt2.cli import main
from gpt2.io.model_dir import load_config
from gpt2.files.paths import follow_run_dir
from gpt2.tokenizer.files import (bpe_files, copy_encoder_files, encoder_fingerprint,
                                  load_encoder)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def test_quickstart_end_to_end_and_its_next_step(tmp_path, capsys, monkeypatch):
    """In-process (./quickstart.sh runs it as a command, whose tests are test_readme's)."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--max_steps", "2", "--batch_size", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "SAMPLE" in stdout and "Next steps" in stdout
    run = out / "checkpoint" / "quickstart"
    ckpt = follow_run_dir(run)
    assert ckpt != run and ckpt.name == "model-2"
    # The run directory holds no tokenizer files of its own: readers follow counter.
    assert bpe_files(run) == bpe_files(ckpt) and bpe_files(ckpt)[0].parent == ckpt
    assert encoder_fingerprint(run) == encoder_fingerprint(ckpt)
    assert load_config(run) == load_config(ckpt)
    assert load_encoder(run).encode("def f(x):") == load_encoder(ckpt).encode("def f(x):")
    copied = copy_encoder_files(run, tmp_path / "copy")
    assert encoder_fingerprint(tmp_path / "copy") == encoder_fingerprint(ckpt) and copied
    # The next step the quickstart prints, on the run directory (the script: test_sample.py).
    assert main(["sample", "--model_dir", str(run), "--top_k", "40", "--nsamples", "1",
                 "--length", "8", "--seed", "1"]) == 0
    assert "SAMPLE 1" in capsys.readouterr().out


def test_quickstart_chat_end_to_end_and_its_next_step(tmp_path, capsys, monkeypatch):
    """The instruction-tuning quickstart on a few steps and a fifth of its chats: the task, the
    byte-level model, the run, the accuracy line; then `gpt2 chat` on the run it prints."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qc"
    assert main(["quickstart", "--chat", "--out", str(out), "--max_steps", "3",
                 "--examples", "4000"]) == 0
    stdout = capsys.readouterr().out
    assert "exact-match accuracy, answers only: " in stdout and "Next steps" in stdout
    assert len((out / "data/train/train.jsonl").read_text().splitlines()) == 4000
    run = out / "checkpoint" / "answers"
    assert (follow_run_dir(run) / "chat_template.jinja").is_file()
    monkeypatch.setattr(sys, "stdin", io.StringIO("upper hello\n"))
    assert main(["chat", str(run), "--max_tokens", "4"]) == 0


@pytest.mark.slow
def test_quickstart_chat_learns_the_task_on_prompts_never_seen(tmp_path):
    """The full instruction-tuning quickstart, both runs (answers only, --train_on_prompt): each
    replies exactly to many of the 200 words it never saw (chance is nil). Which learns faster
    at equal steps is measured, not asserted: bench/RESULTS.md and README have the figures."""
    r = bounded.run([sys.executable, "-m", "gpt2", "quickstart", "--chat", "--compare",
                     "--out", str(tmp_path / "qc")], env=ENV, timeout=3000)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = float(r.stdout.split("answers only: ")[1].split("%")[0])
    prompts = float(r.stdout.split("--train_on_prompt: ")[1].split("%")[0])
    assert answers >= 50 and prompts >= 50, r.stdout[-2000:]


def test_quickstart_align_end_to_end_and_chat_on_its_result(tmp_path, capsys, monkeypatch):
    """The alignment quickstart on a few steps: SFT, then DPO, GRPO and continued SFT from it,
    each scored; `gpt2 chat` runs on the DPO model."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qa"
    assert main(["quickstart", "--align", "--out", str(out), "--max_steps", "2",
                 "--align_steps", "2", "--examples", "400"]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"sft", "sft_more", "dpo", "grpo"}
    assert "val_rewards/accuracies" in results["dpo"] and "val_reward" in results["grpo"]
    assert "exact match" in stdout
    monkeypatch.setattr(sys, "stdin", io.StringIO("upper hello\n"))
    assert main(["chat", str(out / "checkpoint" / "dpo"), "--max_tokens", "4"]) == 0


@pytest.mark.slow
def test_quickstart_align_dpo_learns_the_preferences(tmp_path):
    """The alignment quickstart as shipped: DPO's held-out reward accuracy nears 1; how each
    method's exact match compares with the control is measured (bench/RESULTS.md)."""
    r = bounded.run([sys.executable, "-m", "gpt2", "quickstart", "--align",
                     "--out", str(tmp_path / "qa")], env=ENV, timeout=3000)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "qa" / "results.json").read_text())["results"]
    assert results["dpo"]["val_rewards/accuracies"] >= 0.9, results

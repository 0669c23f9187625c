"""Generation to file: stop strings end each row on its own, output formats, prompts files,
left truncation, reproducibility and clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2.io.model_dir import save_model
from gpt2.cli import run
from gpt2.commands.generate import DELIMITER, main, read_prompts
from gpt2.sampling import cut_at_stop, generate_batch
from gpt2.model import GPT, GPTConfig
from gpt2.sampling import sample_sequence
from helpers import make_model


class CharEncoder:
    """Token i is the character chr(97 + i % 26) (a tiny alphabet: stop strings occur often)."""

    eot_token = 0

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class CountingModel(torch.nn.Module):
    """Wraps a GPT and records the batch size of every forward call."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, tokens, past=None, use_cache=False, last_only=False):
        self.calls.append(tokens.size(0))
        return self.model(tokens, past=past, use_cache=use_cache, last_only=last_only)


def test_cut_at_stop():
    assert cut_at_stop("hello world", ["o", "w"]) == 4
    assert cut_at_stop("hello world", ["x", ""]) is None
    assert cut_at_stop("a\n\nb", ["\n\n"]) == 1


def test_one_row_equals_sample_sequence_cut_at_the_stop(tiny_config):
    model, enc = make_model(tiny_config), CharEncoder()
    context, length = [3, 4, 5], 20
    full = sample_sequence(model, length, torch.tensor([context]), temperature=1.0, seed=11)
    full_text = enc.decode(full[0, len(context):].tolist())
    stop = full_text[7:9]  # a string we know occurs; the cut is at its first occurrence
    g = torch.Generator().manual_seed(11)
    (text,) = generate_batch(model, enc, context, 1, length, stop=[stop], generator=g)
    assert text == full_text[:full_text.index(stop)]
    g = torch.Generator().manual_seed(11)
    assert generate_batch(model, enc, context, 1, length, generator=g) == [full_text]


def test_each_row_stops_on_its_own_and_generation_ends_when_all_have(tiny_config):
    model, enc = CountingModel(make_model(tiny_config)), CharEncoder()
    length, stop = 30, ["q", "z"]
    g = torch.Generator().manual_seed(0)
    texts = generate_batch(model, enc, [1, 2], 16, length, stop=stop, generator=g)
    assert len(texts) == 16
    assert all("q" not in t and "z" not in t for t in texts)
    lengths = sorted(len(t) for t in texts)
    assert lengths[0] < lengths[-1]  # rows stopped at different steps
    # Finished rows leave the batch: the batch shrinks and never grows.
    assert model.calls[0] == 16 and model.calls == sorted(model.calls, reverse=True)
    assert len(model.calls) - 1 <= max(lengths) + 1
    # A stop string every row produces at once: one step, then generation ends.
    model.calls.clear()
    texts = generate_batch(model, enc, [1, 2], 4, length, stop=list("abcdefghijklmnopqrstuvwxyz"))
    assert texts == [""] * 4 and model.calls == [4]


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second, with spaces \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "  second, with spaces "]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb", "id": 1}\n{"prompt": "c"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        read_prompts(str(tmp_path / "bad.jsonl"))


@pytest.fixture
def model_dir(gpt2_vocab_dir, tmp_path) -> Path:
    config = GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    return save_model(make_model(config), tmp_path / "model", encoder_dir=gpt2_vocab_dir)


def test_text_output_unconditional_and_reproducible(model_dir, tmp_path):
    out = tmp_path / "samples.txt"
    args = [str(model_dir), "--nsamples", "5", "--batch_size", "2", "--length", "8",
            "--seed", "3", "--top_k", "40", "--out", str(out)]
    assert main(args) == 0
    text = out.read_text(encoding="utf-8")
    assert text.count("\n" + DELIMITER + "\n") == 5 and text.endswith(DELIMITER + "\n")
    assert main(args) == 0
    assert out.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "samples.txt"]  # no temp files


def test_jsonl_output_with_prompts_file_and_include_prompt(model_dir, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "Hello, my name is"}\n{"prompt": "The meaning of life"}\n')
    out = tmp_path / "out.jsonl"
    assert main([str(model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--nsamples", "3",
                 "--batch_size", "2", "--length", "6", "--seed", "1", "--include_prompt",
                 "--temperature", "0.7", "--stop", "\\n", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello, my name is"] * 3 + ["The meaning of life"] * 3
    assert [r["index"] for r in records] == [0, 1, 2] * 2
    for r in records:
        assert r["sample"].startswith(r["prompt"]) and "\n" not in r["sample"]
        assert r["settings"]["temperature"] == 0.7 and r["settings"]["seed"] == 1
        assert r["settings"]["stop"] == ["\n"] and r["settings"]["length"] == 6


def test_long_prompt_is_left_truncated_with_a_warning(model_dir, capsys):
    prompt = " ".join(f"word{i}" for i in range(100))
    assert main([str(model_dir), "--prompt", prompt, "--length", "10", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning: prompt 1 has" in captured.err and "keeping its last 23" in captured.err
    assert captured.out.endswith(DELIMITER + "\n")


def test_errors_are_one_line(model_dir, tmp_path, capsys):
    cases = [
        ([str(model_dir), "--length", "33"], "--length 33"),
        ([str(model_dir), "--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
        ([str(model_dir), "--top_p", "1.5"], "--top_p"),
        ([str(tmp_path / "nope")], "does not exist"),
        ([str(model_dir), "--out", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        assert run(main, argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err

"""Perplexity: the windows and token counts of the docstring, transformers' numbers on the same
windows, and a token-by-token hand computation of the sliding-window protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2.io.model_dir import save_model
from gpt2.cli import run
from gpt2.commands.evaluate import main
from gpt2.perplexity import evaluate, windows
from gpt2.io.hf import export_huggingface
from gpt2.model import GPTConfig
from helpers import make_model

PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it "
         "was the age of foolishness, it was the epoch of belief, it was the epoch of "
         "incredulity, it was the season of Light, it was the season of Darkness.\n") * 3


def make_chunks(n_vocab: int, lengths=(1, 2, 15, 16, 17, 40, 33)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, n_vocab, size=n) for n in lengths]


def test_windows_and_token_counts():
    # Non-overlapping: each window's first token has no context.
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # Sliding: every token after the first is scored once, with the context before it.
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(1, 4, 4) == [] and windows(4, 4, 1) == [(0, 4, 1)]
    for length in range(1, 40):
        for n_ctx in (1, 3, 8):
            scored = [p for _, end, first in windows(length, n_ctx, n_ctx) for p in range(first, end)]
            assert len(scored) == length - math.ceil(length / n_ctx)
            for stride in range(1, n_ctx):
                scored = [p for _, end, first in windows(length, n_ctx, stride)
                          for p in range(first, end)]
                assert scored == list(range(1, length))  # each once, in order
    with pytest.raises(ValueError):
        windows(10, 4, 5)


def hf_protocol(hf, chunk: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, summing token NLLs instead of averaging window means."""
    ids = torch.from_numpy(chunk).long()[None]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf(x).logits
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        mask = shift_labels != -100
        nll += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
        count += int(mask.sum())
        prev_end = end
        if end == ids.size(1):
            break
    return nll, count


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_perplexity_equals_transformers_on_the_same_windows(tiny_config, tmp_path, stride):
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(n_vocab=97, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    model = make_model(config)
    export_huggingface(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    chunks = make_chunks(config.n_vocab)
    nll, count = 0.0, 0
    for chunk in chunks:
        if len(chunk) > 1:
            a, b = hf_protocol(hf, chunk, config.n_ctx, stride or config.n_ctx)
            nll, count = nll + a, count + b
    result = evaluate(model, chunks, stride=stride, batch_size=3, progress=False)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sliding_window_by_hand(tiny_config):
    """Token p is scored by the first window (begin = k * stride) that reaches past it."""
    model = make_model(tiny_config)
    chunk = make_chunks(tiny_config.n_vocab, lengths=(75,))[0]
    n_ctx, stride = 12, 5
    nll = 0.0
    for p in range(1, len(chunk)):
        k = max(0, math.ceil((p - n_ctx + 1) / stride))
        context = torch.from_numpy(chunk[k * stride:p]).long()[None]
        with torch.no_grad():
            logp = model(context)[0, -1].log_softmax(-1)
        nll -= logp[int(chunk[p])].item()
    result = evaluate(model, [chunk], n_ctx=n_ctx, stride=stride, batch_size=4, progress=False)
    assert result["tokens"] == len(chunk) - 1
    assert result["loss"] == pytest.approx(nll / (len(chunk) - 1), rel=1e-5)


def test_batch_size_and_padding_do_not_change_the_result(tiny_config):
    model = make_model(tiny_config)
    chunks = make_chunks(tiny_config.n_vocab, lengths=(5, 70, 9, 33, 2))
    results = [evaluate(model, chunks, stride=7, batch_size=b, progress=False) for b in (1, 3, 64)]
    for r in results[1:]:
        assert r["tokens"] == results[0]["tokens"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)


def test_library_errors(tiny_config):
    model = make_model(tiny_config)
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate(model, [np.array([1]), np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="n_ctx"):
        evaluate(model, make_chunks(97), n_ctx=tiny_config.n_ctx + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(model, [np.array([1, 2, 500])], progress=False)


@pytest.fixture
def model_dirs(gpt2_vocab_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    config = GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    base = save_model(make_model(config, seed=1), tmp_path / "base", encoder_dir=gpt2_vocab_dir)
    tuned = save_model(make_model(config, seed=2), tmp_path / "tuned", encoder_dir=gpt2_vocab_dir)
    return base, tuned


def test_evaluate_command(model_dirs, tmp_path, capsys):
    base, _ = model_dirs
    (tmp_path / "test.txt").write_text(PROSE)
    assert main([str(base), "--dataset", str(tmp_path / "test.txt"), "--stride", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = dict(line.split(" = ") for line in lines if " = " in line)
    assert set(values) == {"loss", "perplexity", "tokens"}
    assert float(values["perplexity"]) == pytest.approx(math.exp(float(values["loss"])), rel=1e-3)
    assert float(values["loss"]) > 0 and int(values["tokens"]) > 100

    # A corpus directory means its test/ split.
    for split, text in (("train", "train " * 500), ("valid", "valid " * 50), ("test", PROSE)):
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "a.txt").write_text(text)
    assert main([str(base), "--dataset", str(tmp_path / "corpus"), "--stride", "8"]) == 0
    captured = capsys.readouterr()
    assert "test split" in captured.err
    assert [line for line in captured.out.splitlines() if " = " in line] == \
        [line for line in lines if " = " in line]


def test_compare_prints_both_models_and_samples(model_dirs, tmp_path, capsys):
    base, tuned = model_dirs
    (tmp_path / "test.txt").write_text(PROSE)
    args = [str(tuned), "--dataset", str(tmp_path / "test.txt"), "--compare", str(base),
            "--sample_length", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    header, loss, ppl, tokens = out.splitlines()[:4]
    assert header.split() == [str(base), str(tuned)]
    assert loss.startswith("loss") and len(loss.split()) == 3
    assert ppl.startswith("perplexity") and tokens.split()[1] == tokens.split()[2]
    assert "unconditional" in out and out.count(f"---------- {base} ----------") == 2
    assert main(args) == 0
    assert capsys.readouterr().out == out  # fixed prompts and seed: the same samples


def test_command_errors(model_dirs, tmp_path, capsys):
    base, _ = model_dirs
    (tmp_path / "test.txt").write_text(PROSE)
    assert run(main, [str(base), "--dataset", str(tmp_path / "test.txt"), "--stride", "64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --stride 64") and err.count("\n") == 1
    assert run(main, [str(base), "--dataset", str(tmp_path / "missing.txt")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert run(main, [str(tmp_path / "nope"), "--dataset", str(tmp_path / "test.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err

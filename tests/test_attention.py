"""Packed rows through FlexAttention's document mask (gpt2.attention): on the CPU, where only
its forward runs, the same logits and per-token losses as the dense mask, compiled and not;
``--packed_attention`` resolves to the dense mask here and refuses flex with one line."""

from __future__ import annotations

import pytest
import torch

from gpt2.attention import DENSE, resolve, use_dense_masking, use_document_masking
from gpt2.model import GPT, GPTConfig


def packed():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=64, n_ctx=64, n_embd=32, n_head=4, n_layer=2)).eval()
    tokens = torch.randint(0, 64, (2, 40))
    segments = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [4] * 25 + [-1] * 15])
    return model, tokens, segments


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.xdist_group(
    "compile"))])  # (with test_capture.py: Inductor's start-up paid once)
def test_document_mask_equals_the_dense_mask(compiled):
    model, tokens, segments = packed()
    with torch.no_grad():
        dense_logits = model(tokens, segments=segments)
        dense_loss = model(tokens, targets=tokens, segments=segments, reduction="none")
        use_document_masking(model, compiled=compiled)
        logits = model(tokens, segments=segments)
        loss = model(tokens, targets=tokens, segments=segments, reduction="none")
        use_dense_masking(model)
        assert torch.equal(model(tokens, segments=segments), dense_logits)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, dense_loss, rtol=0, atol=1e-5)
    # and each segment as if it were alone
    alone = model(tokens[:1, 7:27])
    torch.testing.assert_close(logits[:1, 7:27], alone, rtol=0, atol=1e-5)


def test_the_flag_chooses_dense_on_the_cpu_and_refuses_flex_with_a_reason():
    assert resolve("auto", "cpu") == DENSE and resolve("dense", "cpu") == DENSE
    with pytest.raises(ValueError, match="no backward pass on the CPU"):
        resolve("flex", "cpu")
    model, _, _ = packed()
    model.config.dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        use_document_masking(model)


def test_train_refuses_flex_on_the_cpu_in_one_line(tmp_path):
    import sys

    import bounded

    r = bounded.run([sys.executable, "-m", "gpt2", "train", "--dataset", str(tmp_path / "x"),
                     "--packed_attention", "flex", "--device", "cpu"], timeout=120)
    assert r.returncode != 0 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

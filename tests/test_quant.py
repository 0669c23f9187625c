"""int8 weights (gpt2.quant): the layer computes with the weights it stores, the model's
perplexity stays within 1% of fp32 on a trained model, and every sampling and scoring command
takes ``--dtype int8``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2.io.model_dir import load_model
from gpt2.quant import Int8Linear, quantize_int8


def test_int8_weights_are_per_channel_and_both_kernels_use_them():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud output channel must not coarsen the others
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scales = w.abs().amax(1) / 127
    assert q.qweight.dtype == torch.int8 and torch.equal(q.scales, scales)
    assert q.kernel == "fbgemm" and not hasattr(q, "weight")  # no fp32 copy kept
    assert ((q.dequantized() - w).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 7, 256)
    exact = F.linear(x, q.dequantized(), linear.bias)
    # CPU: FBGEMM also rounds the input to 8 bits (one scale per call): ~1% of the output
    y = q(x)
    assert y.shape == (5, 7, 96)
    assert ((y - exact).norm() / exact.norm()).item() < 0.02
    # CUDA: weight-only int8 (aten._weight_int8pack_mm; it has a CPU kernel too, slow);
    # elsewhere the dequantized weight: both exact up to fp32 rounding
    for kernel in ("int8pack", "dequantize"):
        other = Int8Linear(linear, kernel=kernel)
        assert other.handle == -1
        torch.testing.assert_close(other(x), exact, rtol=1e-5, atol=1e-5)
    # a real error inside a kernel is raised, not hidden by a fallback
    with pytest.raises(RuntimeError):
        q(torch.randn(3, 255))
    with pytest.raises(ValueError, match="kernel must be"):
        Int8Linear(linear, kernel="magic")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The test_train tiny model trained on pydoc text (40 steps), and its held-out text."""
    from pydoc_data.topics import topics

    from test_train import args, main, make_model_dir

    root = tmp_path_factory.mktemp("int8")
    text = "\n".join(topics[k] for k in sorted(topics)[:12])
    (root / "train.txt").write_text(text[:-10000])
    (root / "test.txt").write_text(text[-10000:])
    model_dir = make_model_dir(root / "init", n_embd=64, n_layer=2, n_head=4, n_ctx=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("GPT2_CACHE", str(root / "cache"))
        assert main(args(root / "train.txt", model_dir, max_steps=60, batch_size=8)) == 0
    return root / "checkpoint/run1", root / "test.txt"


def test_int8_perplexity_within_one_percent_of_fp32(trained, capsys, monkeypatch, tmp_path):
    from gpt2.cli import main

    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    run, test = trained
    ppl = {}
    for dtype in ("fp32", "int8"):
        assert main(["evaluate", str(run), "--dataset", str(test), "--dtype", dtype]) == 0
        out = dict(line.split(" = ") for line in capsys.readouterr().out.splitlines()
                   if " = " in line)
        ppl[dtype] = float(out["perplexity"])
    assert ppl["fp32"] < 100  # trained: far below the 257-way uniform guess
    assert ppl["int8"] != ppl["fp32"] and abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01, ppl


def test_sampling_commands_take_dtype_int8(trained, capsys, tmp_path):
    from gpt2.cli import main

    run, _ = trained
    assert main(["sample", "--model_dir", str(run), "--nsamples", "1", "--length", "8",
                 "--seed", "1", "--dtype", "int8"]) == 0
    assert "SAMPLE 1" in capsys.readouterr().out
    prompts = tmp_path / "p.txt"
    prompts.write_text("The \nA \n")
    assert main(["generate", str(run), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o.jsonl"), "--length", "8", "--dtype", "int8"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    model = quantize_int8(load_model(run))
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.h[0].mlp.c_fc, Int8Linear)
    assert model.wte.weight.dtype == torch.float32  # the embeddings stay as they are
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():  # the scores stay close to fp32's (scoring: test above)
        exact = load_model(run)(ids)
        assert ((model(ids) - exact).norm() / exact.norm()).item() < 0.05

"""Benchmarks scored as their references: HellaSwag equals build-nanogpt's hellaswag.py scoring
(rewritten below with transformers' GPT2LMHeadModel and tiktoken, as that script runs) on the
same weights and rows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_model
from test_dataset import ref  # noqa: F401  (fixture: tiktoken's GPT-2 encoding)

from gpt2.cli import main
from gpt2.io.hf import export_huggingface
from gpt2.io.model_dir import save_model
from gpt2.model import GPTConfig

transformers = pytest.importorskip("transformers")

CTXS = ["A man is sitting on a roof. he", "A woman holds a violin under her chin. She",
        "How to bake bread: Mix the flour and water.", "The kids run onto the field. They",
        "Two dogs chase a ball across the yard. one dog", "A chef slices onions on a board. he",
        "Making tea: Boil the water first.", "The skier reaches the top of the slope. she"]
ENDINGS = ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof.",
           "plays a slow melody while swaying.", "then let the dough rest for an hour.",
           "kick the ball toward the goal.", "catches it and runs back, tail wagging.",
           "throws them into a hot pan with oil.", "pushes off and glides down quickly."]


def write_rows(path, n: int = 24) -> None:
    """Records in rowanz's format (the fields of hellaswag_val.jsonl), content of our own."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            ctx = CTXS[i % len(CTXS)] + (" And again," * (i % 3))
            endings = [ENDINGS[(i + k * 3) % len(ENDINGS)] for k in range(4)]
            a, _, b = ctx.rpartition(". ")
            f.write(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": a + ".",
                                "ctx_b": b, "ctx": ctx, "split": "val",
                                "split_type": "indomain", "label": (i * 7) % 4,
                                "endings": endings, "source_id": f"test~{i}"}) + "\n")


def build_nanogpt_scores(hf_dir, path, enc) -> tuple[list[int], list[int]]:
    """hellaswag.py's evaluate(): per example, the argmin of summed and of mean ending loss."""
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    preds, preds_norm = [], []
    for line in open(path, encoding="utf-8"):
        example = json.loads(line)
        ctx_tokens = enc.encode(example["ctx"])
        rows, masks = [], []
        for end in example["endings"]:
            end_tokens = enc.encode(" " + end)
            rows.append(ctx_tokens + end_tokens)
            masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
        width = max(map(len, rows))
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, (t, m) in enumerate(zip(rows, masks)):
            tokens[i, :len(t)], mask[i, :len(m)] = torch.tensor(t), torch.tensor(m)
        with torch.no_grad():
            logits = model(tokens).logits
        losses = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.size(-1)),
                                 tokens[..., 1:].reshape(-1), reduction="none").view(4, -1)
        shift_mask = mask[..., 1:]
        total = (losses * shift_mask).sum(dim=1)
        preds.append(int(total.argmin()))
        preds_norm.append(int((total / shift_mask.sum(dim=1)).argmin()))
    return preds, preds_norm


def test_hellaswag_equals_build_nanogpt_scoring(tmp_path, gpt2_vocab_dir, ref, capsys):  # noqa: F811
    model = make_model(GPTConfig(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2))
    with torch.no_grad():
        model.wte.weight.mul_(4)  # peakier predictions: endings differ in loss by more
    save_model(model, tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    export_huggingface(model, tmp_path / "hf", encoder_dir=gpt2_vocab_dir)
    data = tmp_path / "hellaswag_val.jsonl"
    write_rows(data)
    assert main(["evaluate", str(tmp_path / "model"), "--task", "hellaswag", "--data", str(data),
                 "--batch_size", "3", "--out", str(tmp_path / "hs.json")]) == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "hs.json").read_text())
    labels = [json.loads(line)["label"] for line in open(data)]
    preds, preds_norm = build_nanogpt_scores(tmp_path / "hf", data, ref)
    assert result["correct"] == sum(p == y for p, y in zip(preds, labels))
    assert result["correct_norm"] == sum(p == y for p, y in zip(preds_norm, labels))
    assert result["examples"] == 24 and result["dtype"] == "fp32"
    assert len(result["data_sha256"]) == 64
    assert f"| hellaswag | 24 | {result['acc']:.4f} | {result['acc_norm']:.4f} |" in table

    assert main(["evaluate", str(tmp_path / "model"), "--task", "hellaswag", "--data", str(data),
                 "--limit", "5", "--out", str(tmp_path / "five.json")]) == 0
    assert json.loads((tmp_path / "five.json").read_text())["examples"] == 5


@pytest.mark.parametrize("line, says", [
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "'endings' must be a list of 4"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be 0, 1, 2 or 3"),
    ('{"ctx": 3, "endings": ["a", "b", "c", "d"], "label": 0}', "'ctx' must be a string"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "lab', "not a JSON record"),
])
def test_a_bad_hellaswag_record_is_one_line_naming_file_and_line(tmp_path, gpt2_vocab_dir,
                                                                 capsys, line, says):
    save_model(make_model(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)),
               tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    data = tmp_path / "hs.jsonl"
    write_rows(data, 2)
    with open(data, "a") as f:
        f.write(line + "\n")
    assert main(["evaluate", str(tmp_path / "model"), "--task", "hellaswag", "--data",
                 str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}:3: ") and says in err[0], err

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


LAMBADA_YAML = """task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
HARNESS = """import json, sys, lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32", tasks=["lambada_local"],
    task_manager=TaskManager(include_path=sys.argv[2]), device="cpu", batch_size=4)
print("RESULT " + json.dumps(r["results"]["lambada_local"]))
"""


def write_lambada(path, n: int = 40) -> None:
    """Records as in OpenAI's lambada_test.jsonl ({"text": ...}), text of our own."""
    import random

    rng = random.Random(0)
    words = ("the cat sat on a mat while her brother read the old book about ships and stars, "
             "then said: \"it's late\" and walked home").split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words)
                                                 for _ in range(rng.randint(6, 40)))}) + "\n")


@pytest.mark.slow
def test_lambada_equals_lm_evaluation_harness(tmp_path, gpt2_vocab_dir, capsys):
    """lm-evaluation-harness's own lambada_openai (a copy reading a local file), run with its
    Hugging Face backend on our export of the same weights: same acc, perplexity to 1e-4."""
    import os
    import sys

    import bounded

    pytest.importorskip("lm_eval")
    model = make_model(GPTConfig(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2))
    with torch.no_grad():
        model.wte.weight.mul_(4)
    save_model(model, tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    export_huggingface(model, tmp_path / "hf", encoder_dir=gpt2_vocab_dir)
    data = tmp_path / "lambada_test.jsonl"
    write_lambada(data)
    # Half the records end in the model's own greedy next word, so that acc is not 0 for both
    from gpt2.tokenizer.files import load_encoder

    enc = load_encoder(tmp_path / "model")
    rows = [json.loads(line) for line in open(data)]
    for row in rows[::2]:
        ctx = row["text"].rsplit(" ", 1)[0]
        with torch.no_grad():
            word = enc.decode([int(model(torch.tensor([enc.encode(ctx)]))[0, -1].argmax())])
        if word.startswith(" ") and word[1:].isalpha():
            row["text"] = ctx + word
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/lambada_local.yaml").write_text(LAMBADA_YAML.format(data=data))
    (tmp_path / "harness.py").write_text(HARNESS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hfcache")}
    r = bounded.run([sys.executable, str(tmp_path / "harness.py"), str(tmp_path / "hf"),
                     str(tmp_path / "tasks")], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.split("RESULT ")[1].splitlines()[0])
    assert main(["evaluate", str(tmp_path / "model"), "--task", "lambada", "--data", str(data),
                 "--out", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    print(f"harness: acc {theirs['acc,none']} perplexity {theirs['perplexity,none']}; "
          f"ours: acc {ours['acc']} perplexity {ours['perplexity']}")
    assert ours["acc"] == theirs["acc,none"] > 0 and ours["examples"] == 40
    assert ours["perplexity"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)


def test_a_bad_lambada_record_is_one_line(tmp_path, gpt2_vocab_dir, capsys):
    save_model(make_model(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)),
               tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    data = tmp_path / "lambada_test.jsonl"
    write_lambada(data, 3)
    with open(data, "a") as f:
        f.write('{"text": "oneword"}\n')
    assert main(["evaluate", str(tmp_path / "model"), "--task", "lambada", "--data",
                 str(data)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {data}:4: 'text' must be a string of at "
                                               "least two words")


def test_flags_that_do_not_apply_to_a_task_are_refused(tmp_path, capsys):
    data = tmp_path / "hs.jsonl"
    write_rows(data, 2)
    for flag in (["--n_ctx", "16"], ["--stride", "8"], ["--dataset", "x.txt"],
                 ["--precision", "bf16"]):
        assert main(["evaluate", str(tmp_path), "--task", "hellaswag", "--data", str(data),
                     *flag]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag[0]} does not apply to --task"), err

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
WIKITEXT_YAML = """task: wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_YAML = """task: gen_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
HARNESS = """import json, sys, lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32",
    tasks=sys.argv[3].split(","), task_manager=TaskManager(include_path=sys.argv[2]),
    device="cpu", batch_size=4)
print("RESULT " + json.dumps(r["results"]))
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


def hf_greedy(hf, enc, prompt: str, length: int, stop: list[str]) -> str:
    """transformers' greedy continuation of ``prompt``, cut at the first stop string."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([enc.encode(prompt)]), max_new_tokens=length,
                          do_sample=False, pad_token_id=50256)
    text = enc.decode(out[0, len(enc.encode(prompt)):].tolist())
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


@pytest.mark.slow
def test_tasks_and_backend_equal_lm_evaluation_harness(tmp_path, gpt2_vocab_dir, capsys):
    """lm-evaluation-harness's lambada_openai and wikitext (copies reading local files) and a
    generation task, run with its Hugging Face backend on our export of the same weights:
    `gpt2 evaluate --task` and `gpt2 lm-eval` (our backend) give the same accuracies and
    perplexities to 1e-4."""
    import os
    import shutil
    import sys
    from pathlib import Path

    import bounded

    lm_eval = pytest.importorskip("lm_eval")
    from gpt2.tokenizer.files import load_encoder

    model = make_model(GPTConfig(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2))
    with torch.no_grad():
        model.wte.weight.mul_(4)
    save_model(model, tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    export_huggingface(model, tmp_path / "hf", encoder_dir=gpt2_vocab_dir)
    enc = load_encoder(tmp_path / "model")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()

    lambada = tmp_path / "lambada_test.jsonl"
    write_lambada(lambada)
    rows = [json.loads(line) for line in open(lambada)]
    for row in rows[::2]:  # half end in the model's own greedy next word: acc is not 0
        ctx = row["text"].rsplit(" ", 1)[0]
        word = hf_greedy(hf, enc, ctx, 1, [])
        if word.startswith(" ") and word[1:].isalpha():
            row["text"] = ctx + word
    lambada.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = write_wikitext(tmp_path / "wikitext-2-raw-v1.zip", pages=5)
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps({"page": p}) + "\n" for p in reference_pages(raw)))
    gen = tmp_path / "gen.jsonl"
    with open(gen, "w") as f:
        for i, ctx in enumerate(CTXS * 2):
            answer = hf_greedy(hf, enc, ctx, 12, [".", "\n"]) if i % 2 else " nothing"
            f.write(json.dumps({"prompt": ctx, "answer": answer}) + "\n")

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lambada_local.yaml").write_text(LAMBADA_YAML.format(data=lambada))
    (tasks / "wikitext_local.yaml").write_text(WIKITEXT_YAML.format(data=pages))
    (tasks / "gen_local.yaml").write_text(GEN_YAML.format(data=gen))
    shutil.copy(Path(lm_eval.__file__).parent / "tasks/wikitext/preprocess_wikitext.py", tasks)
    (tmp_path / "harness.py").write_text(HARNESS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hfcache")}
    names = "lambada_local,wikitext_local,gen_local"
    r = bounded.run([sys.executable, str(tmp_path / "harness.py"), str(tmp_path / "hf"),
                     str(tasks), names], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.split("RESULT ")[1].splitlines()[0])

    assert main(["evaluate", str(tmp_path / "model"), "--task", "lambada", "--data",
                 str(lambada), "--out", str(tmp_path / "lambada.json")]) == 0
    assert main(["evaluate", str(tmp_path / "model"), "--task", "wikitext2", "--data",
                 str(tmp_path / "wikitext-2-raw-v1.zip"), "--out",
                 str(tmp_path / "wikitext.json")]) == 0
    for key, value in env.items():
        os.environ[key] = value  # (monkeypatch would not reach the harness's cached settings)
    assert main(["lm-eval", str(tmp_path / "model"), "--tasks", names, "--include_path",
                 str(tasks), "--batch_size", "3", "--out", str(tmp_path / "backend.json")]) == 0
    backend = json.loads((tmp_path / "backend.json").read_text())["results"]
    assert main(["lm-eval", str(tmp_path / "model"), "--tasks", "no_such_task_xyz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --tasks: unknown task 'no_such_task_xyz'"), err
    ours = {"lambada": json.loads((tmp_path / "lambada.json").read_text()),
            "wikitext": json.loads((tmp_path / "wikitext.json").read_text())}
    print(json.dumps({"harness_hf": theirs, "gpt2_lm_eval": backend, "gpt2_evaluate": ours},
                     indent=1))
    assert ours["lambada"]["acc"] == theirs["lambada_local"]["acc,none"] > 0
    assert ours["lambada"]["perplexity"] == pytest.approx(
        theirs["lambada_local"]["perplexity,none"], rel=1e-4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["wikitext"][metric] == pytest.approx(
            theirs["wikitext_local"][f"{metric},none"], rel=1e-4)
    for task, metrics in (("lambada_local", ("acc", "perplexity")),
                          ("wikitext_local", ("word_perplexity", "bits_per_byte")),
                          ("gen_local", ("exact_match",))):
        for metric in metrics:
            assert backend[task][f"{metric},none"] == pytest.approx(
                theirs[task][f"{metric},none"], rel=1e-4), (task, metric)
    assert theirs["gen_local"]["exact_match,none"] > 0


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


WIKI_WORDS = ("the river , which flows north @-@ east through 1 @,@ 200 km of forest , was named "
              "in 1856 ( after a surveyor ) . it 's \" long \" and 3 @.@ 5 m deep ; fish live "
              "there ! N species are known ? the town 's mayor said : ' yes ' [ 4 ] 20 ° C").split()


def write_wikitext(path, pages: int = 6, seed: int = 0) -> str:
    """A zip laid out as wikitext-2-raw-v1.zip (wikitext-2-raw/wiki.test.raw), in WikiText's
    raw format (a blank line as " ", headings " = Title = ", spaced punctuation), text of our
    own; returns the raw text."""
    import random
    import zipfile

    rng = random.Random(seed)
    lines = [" "]
    for p in range(pages):
        lines += [f" = Article {p} = ", " "]
        for s in range(rng.randint(1, 3)):
            lines += [f" = = Section {s} = = ", " "] if s else []
            for _ in range(rng.randint(1, 3)):
                lines += [" " + " ".join(rng.choice(WIKI_WORDS)
                                         for _ in range(rng.randint(5, 90))) + " ", " "]
    raw = "\n".join(lines) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", raw)
        z.writestr("wikitext-2-raw/wiki.test.raw", raw)
    return raw


def reference_pages(raw: str) -> list[str]:
    """EleutherAI/wikitext_document_level's split (its loader's _generate_examples)."""
    key, ret, out = 0, [], []
    for line in raw.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(ret)
            if page.strip():
                out.append(page)
            ret = []
        ret.append(line)
    out.append("\n".join(ret))
    return out


def test_wikitext_pages_and_detokenizer_are_the_harness_s(tmp_path):
    """The articles are the harness's data's, detokenized by its own function."""
    pytest.importorskip("lm_eval")
    import importlib.util
    from pathlib import Path

    import lm_eval

    from gpt2.tasks import read_wikitext, rolling_windows, wikitext_detokenize

    spec = importlib.util.spec_from_file_location(
        "preprocess_wikitext",
        Path(lm_eval.__file__).parent / "tasks/wikitext/preprocess_wikitext.py")
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    raw = write_wikitext(tmp_path / "w.zip", pages=8)
    pages = [r["page"] for r in read_wikitext(tmp_path / "w.zip")]
    assert pages == reference_pages(raw) and len(pages) == 8
    for page in pages:
        assert wikitext_detokenize(page) == theirs.wikitext_detokenizer({"page": page})
    (tmp_path / "wiki.test.raw").write_text(raw)
    assert [r["page"] for r in read_wikitext(tmp_path / "wiki.test.raw", limit=3)] == pages[:3]

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for length in (1, 15, 16, 17, 40):
        for n in (1, 4, 16):
            ids = list(range(100, 100 + length))
            want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, n, 1)]
            assert rolling_windows(ids, 7, n) == [(list(a), list(b)) for a, b in want]


def test_wikitext_token_perplexity_equals_transformers_sliding_window(tmp_path, gpt2_vocab_dir,
                                                                      capsys):
    """token_perplexity: Hugging Face's sliding-window recipe on each article (after
    <|endoftext|>), run with transformers on our export of the same weights."""
    model = make_model(GPTConfig(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=2))
    save_model(model, tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    export_huggingface(model, tmp_path / "hf", encoder_dir=gpt2_vocab_dir)
    write_wikitext(tmp_path / "wikitext-2-raw-v1.zip", pages=3)
    assert main(["evaluate", str(tmp_path / "model"), "--task", "wikitext2", "--data",
                 str(tmp_path / "wikitext-2-raw-v1.zip"), "--stride", "24", "--out",
                 str(tmp_path / "w.json")]) == 0
    ours = json.loads((tmp_path / "w.json").read_text())

    from gpt2.tasks import read_wikitext, wikitext_detokenize
    from gpt2.tokenizer.files import load_encoder

    enc = load_encoder(tmp_path / "model")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    nll, count = 0.0, 0
    for row in read_wikitext(tmp_path / "wikitext-2-raw-v1.zip"):
        ids = torch.tensor([[50256] + enc.encode(wikitext_detokenize(row["page"]))])
        prev_end = 0
        for begin in range(0, ids.size(1), 24):
            end = min(begin + 64, ids.size(1))
            target = ids[:, begin:end].clone()
            target[:, :max(prev_end - begin, 1)] = -100  # scored already (or no context)
            with torch.no_grad():
                logits = hf(ids[:, begin:end]).logits
            loss = F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100,
                                   reduction="sum")
            nll += float(loss)
            count += int((target[0, 1:] != -100).sum())
            prev_end = end
            if end == ids.size(1):
                break
    assert ours["tokens"] == count and ours["stride"] == 24
    assert ours["token_perplexity"] == pytest.approx(float(torch.tensor(nll / count).exp()),
                                                     rel=1e-5)
    assert ours["examples"] == 3 and ours["words"] > 0 and ours["word_perplexity"] > 1
    assert "| wikitext2 | 3 |" in capsys.readouterr().out


def test_a_bad_wikitext_file_is_one_line(tmp_path, gpt2_vocab_dir, capsys):
    save_model(make_model(GPTConfig(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)),
               tmp_path / "model", encoder_dir=gpt2_vocab_dir)
    whole = tmp_path / "whole.zip"
    write_wikitext(whole, pages=2)
    cut = tmp_path / "wikitext-2-raw-v1.zip"
    cut.write_bytes(whole.read_bytes()[:-100])  # a download cut short
    latin = tmp_path / "wiki.test.raw"
    latin.write_bytes(" = T = \n caf\xe9 \n".encode("latin-1"))
    pages = tmp_path / "pages.jsonl"
    pages.write_text('{"page": " = T = "}\n{"text": "x"}\n')
    for data, task, says in ((cut, "wikitext2", "not a readable zip"),
                             (whole, "wikitext103", "has no wikitext-103-raw/wiki.test.raw"),
                             (latin, "wikitext2", "not UTF-8 text (byte"),
                             (pages, "wikitext2", "pages.jsonl:2: 'page' must be a string")):
        assert main(["evaluate", str(tmp_path / "model"), "--task", task, "--data",
                     str(data)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert main(["evaluate", str(tmp_path / "model"), "--task", "lambada", "--data_dir",
                 str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --task lambada: no {tmp_path / 'none/lambada_test.jsonl'}; run `gpt2 download "
        "--dataset lambada` or give --data PATH")

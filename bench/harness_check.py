"""Our benchmark scoring and our lm-evaluation-harness backend against the harness itself, on a
trained model (the quickstart's, by default) and task files made from its corpus.

    python bench/harness_check.py --model /tmp/qs/checkpoint/quickstart --corpus /tmp/qs/corpus

Three local harness tasks (copies of ``lambada_openai`` and ``wikitext`` reading local files,
and a ``generate_until`` task) run with the harness's Hugging Face backend on our export of
the model, with ``gpt2 lm-eval`` (our backend) and, for LAMBADA and WikiText, with ``gpt2
evaluate --task``. Prints every number and the largest relative difference. Needs
``pip install 'gpt2[eval]' transformers accelerate``; offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LAMBADA = """task: lambada_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""
WIKITEXT = """task: wikitext_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
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
GEN = """task: gen_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 16, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""
HARNESS = """import json, sys, lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32",
    tasks=sys.argv[3].split(","), task_manager=TaskManager(include_path=sys.argv[2]),
    device="cpu", batch_size=8)
print("RESULT " + json.dumps(r["results"]))
"""


def paragraphs(corpus: Path) -> list[str]:
    files = sorted((corpus / "test").rglob("*.txt")) or sorted(corpus.rglob("*.txt"))
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 12]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model or run directory")
    p.add_argument("--corpus", required=True, help="a folder of .txt (its test/ if it has one)")
    p.add_argument("--n", type=int, default=200, help="LAMBADA records and generation prompts")
    args = p.parse_args()

    from gpt2.io.hf import export_huggingface
    from gpt2.io.model_dir import load_model
    from gpt2.files.paths import find_model_dir
    from gpt2.tasks import wikitext_pages

    rng = random.Random(0)
    paras = paragraphs(Path(args.corpus))
    tmp = Path(tempfile.mkdtemp(prefix="harness_check-"))
    model_dir = find_model_dir(args.model)
    export_huggingface(load_model(model_dir), tmp / "hf", encoder_dir=model_dir)
    lambada, gen, pages = tmp / "lambada.jsonl", tmp / "gen.jsonl", tmp / "pages.jsonl"
    with open(lambada, "w") as f:
        for para in rng.sample(paras, min(args.n, len(paras))):
            words = para.split(" ")
            f.write(json.dumps({"text": " ".join(words[:rng.randint(12, min(80, len(words)))])})
                    + "\n")
    import torch
    import transformers

    from gpt2.tokenizer.files import load_encoder

    enc, hf_model = load_encoder(model_dir), transformers.GPT2LMHeadModel.from_pretrained(
        tmp / "hf").eval()
    with open(gen, "w") as f:  # half the answers are transformers' greedy continuation
        for i, para in enumerate(rng.sample(paras, min(args.n // 4, len(paras)))):
            prompt = " ".join(para.split(" ")[:8])
            ids = enc.encode(prompt)
            with torch.no_grad():
                new = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                        pad_token_id=0)[0, len(ids):].tolist()
            answer = enc.decode(new).split(".")[0] if i % 2 else " " + " ".join(
                para.split(" ")[8:12])
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    # WikiText's raw format: " = Title = " pages, blank lines as " ", spaced punctuation
    lines = [" "]
    for k in range(12):
        lines += [f" = Article {k} = ", " "]
        for para in rng.sample(paras, 4):
            lines += [" " + re.sub(r"([,.;:()])", r" \1 ", para).replace("  ", " ") + " ", " "]
    raw = "\n".join(lines) + "\n"
    with zipfile.ZipFile(tmp / "wikitext-2-raw-v1.zip", "w") as z:
        z.writestr("wikitext-2-raw/wiki.test.raw", raw)
    pages.write_text("".join(json.dumps({"page": p}) + "\n" for p in wikitext_pages(raw)))

    import lm_eval

    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "lambada_local.yaml").write_text(LAMBADA.format(data=lambada))
    (tasks / "wikitext_local.yaml").write_text(WIKITEXT.format(data=pages))
    (tasks / "gen_local.yaml").write_text(GEN.format(data=gen))
    shutil.copy(Path(lm_eval.__file__).parent / "tasks/wikitext/preprocess_wikitext.py", tasks)
    (tmp / "harness.py").write_text(HARNESS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "hfcache")}
    names = "lambada_local,wikitext_local,gen_local"
    out = subprocess.run([sys.executable, str(tmp / "harness.py"), str(tmp / "hf"), str(tasks),
                          names], env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    hf = json.loads(out.stdout.split("RESULT ")[1].splitlines()[0])
    os.environ.update(env)
    gpt2 = [sys.executable, "-m", "gpt2"]
    subprocess.run(gpt2 + ["lm-eval", str(model_dir), "--tasks", names, "--include_path",
                           str(tasks), "--out", str(tmp / "backend.json")], check=True,
                   env=env, capture_output=True)
    ours = json.loads((tmp / "backend.json").read_text())["results"]
    for task, data in (("lambada", lambada), ("wikitext2", tmp / "wikitext-2-raw-v1.zip")):
        subprocess.run(gpt2 + ["evaluate", str(model_dir), "--task", task, "--data", str(data),
                               "--out", str(tmp / f"{task}.json")], check=True, env=env,
                       capture_output=True)
    direct = {"lambada_local": json.loads((tmp / "lambada.json").read_text()),
              "wikitext_local": json.loads((tmp / "wikitext2.json").read_text())}
    print(f"model {model_dir}; {sum(1 for _ in open(lambada))} LAMBADA records, "
          f"{len(wikitext_pages(raw))} WikiText pages, {sum(1 for _ in open(gen))} prompts")
    print("| task | metric | harness `hf` | `gpt2 lm-eval` | `gpt2 evaluate --task` |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for task, metrics in (("lambada_local", ("acc", "perplexity")),
                          ("wikitext_local", ("word_perplexity", "byte_perplexity",
                                              "bits_per_byte")),
                          ("gen_local", ("exact_match",))):
        for m in metrics:
            a, b = hf[task][f"{m},none"], ours[task][f"{m},none"]
            c = direct.get(task, {}).get(m)
            for x in (b, c):
                if x is not None and a:
                    worst = max(worst, abs(x - a) / abs(a))
            print(f"| {task} | {m} | {a!r} | {b!r} | {'—' if c is None else repr(c)} |")
    print(f"largest relative difference from the harness: {worst:.2e}")
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

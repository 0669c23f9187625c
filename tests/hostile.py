"""Hostile inputs, one table per surface: what a new user (or an attacker) may hand each command,
and what must come back: one line ``error: <file or flag>: <what is wrong>``, a non-zero exit,
no traceback, nothing half-written, quickly; the server answers 4xx and keeps serving.

tests/test_hostile.py runs every case in-process (the server in a process of its own). Run as a
script it runs each case as a command in a fresh process against any source tree and prints
the counts per surface, which is how a closing note says "before and after":

    python tests/hostile.py --src src            # this tree
    python tests/hostile.py --src /tmp/old/src   # another checkout (cases killed after --timeout)

A new surface or a new hostile input is a row here: :class:`Case` for a command line,
:data:`REQUESTS` for the server. Files a case needs are built by name in :func:`write_files`.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# What every hostile template path renders: the first message's content picks the attack.
TEMPLATE = """\
{%- set key = messages[0]['content'] -%}
{%- if key == 'pow' -%}{{ 9**(9**9) }}
{%- elif key == 'repeat' -%}{{ 'a' * 10**8 }}
{%- elif key == 'loops' -%}{% for i in range(60000) %}{% for j in range(60000) %}{{ '' }}\
{% endfor %}{% endfor %}
{%- elif key == 'doubling' -%}{% set ns = namespace(s='ab') %}{% for i in range(40) %}\
{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}
{%- elif key == 'center' -%}{{ 'a'|center(10**9) }}
{%- elif key == 'format' -%}{{ '{:>999999999}'.format(1) }}
{%- elif key == 'recursion' -%}{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}
{%- elif key == 'generation' -%}{% generation %}{% for i in range(60000) %}{{ 'x' * 60000 }}\
{% endfor %}{% endgeneration %}
{%- elif key == 'ljust' -%}{{ 'a'.ljust(300000000) }}
{%- elif key == 'tojson' -%}{{ messages|tojson(indent=10**10) }}
{%- elif key == 'nested' -%}{% set a = [0] * 4000 %}{% set b = [a] * 4000 %}{{ b }}
{%- elif key == 'raise' -%}{{ raise_exception('no such role here') }}
{%- elif key == 'nothing' -%}
{%- else -%}
{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}
{%- endif -%}
"""
ATTACKS = ("pow", "repeat", "loops", "doubling", "center", "format", "recursion", "generation",
           "ljust", "tojson", "nested", "raise", "nothing")


@dataclass
class Case:
    """One command line. ``argv`` may name ``{model}`` (a tiny model directory), ``{tmp}`` (the
    case's folder, holding the files of :func:`write_files`) and ``{template}``. ``says``: what
    the one error line must contain (``code`` 0: the command must succeed instead)."""

    surface: str
    name: str
    argv: list[str]
    says: str = ""
    code: int = 1
    stdin: str | None = None
    needs: str = ""                       # "mount": a tmpfs of its own (root, Linux)
    untouched: list[str] = field(default_factory=list)  # outputs that must not exist after


def chat_line(content: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}]}) + "\n"


def example_line(messages: list[dict]) -> str:
    return json.dumps({"messages": messages}) + "\n"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hellaswag(n: int = 4, label=None) -> str:
    return "".join(json.dumps({"ctx": f"A man sits on a roof {i}. he", "endings": [
        "starts a song.", "is using wrap.", "falls asleep.", "waves."],
        "label": (i % 4) if label is None else label}) + "\n" for i in range(n))


def _lambada(n: int = 4) -> str:
    return "".join(json.dumps({"text": f"she looked at the old {w} and smiled"}) + "\n"
                   for w in ("house", "dog", "tree", "car")[:n])


def _zip_bomb(path: Path) -> None:
    """A WikiText zip whose test split is 72 MB of one byte (a bigger bomb is the same)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("wikitext-2-raw/wiki.test.raw", "w", force_zip64=True) as f:
            block = b" " * (1 << 20)
            for _ in range(72):
                f.write(block)


def _corrupt_parquet(messages: list[dict]) -> bytes:
    """A parquet file of chats whose footer reads but whose pages are damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table({"messages": [messages] * 50}), out)
    data = bytearray(out.getvalue())
    data[4:44] = bytes(b ^ 0xFF for b in data[4:44])
    return bytes(data)


def write_files(tmp: Path) -> None:
    """Every file a case names, in ``tmp``."""
    w = lambda name, data: (tmp / name).write_bytes(  # noqa: E731
        data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    w("template.jinja", TEMPLATE)
    w("broken.jinja", "{% if %}")
    for attack in ATTACKS:
        w(f"chat-{attack}.jsonl", chat_line(attack))
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    w("train-pow.jsonl", example_line([{"role": "user", "content": "pow"}, ok[1]]))
    w("role-list.jsonl", example_line([{"role": ["user"], "content": "x"}, ok[1]]))
    w("role-object.jsonl", example_line([{"role": {"a": 1}, "content": "x"}, ok[1]]))
    w("sharegpt-from-list.jsonl", json.dumps({"conversations": [
        {"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]}) + "\n")
    w("deep.jsonl", example_line(ok) + '{"messages": ' + _nested(100_000) + "}\n")
    whole = (example_line(ok) * 200).encode()
    w("cut.jsonl.gz", gzip.compress(whole)[:-40])
    w("not-gzip.jsonl.gz", whole)
    w("cut.jsonl.bz2", bz2.compress(whole)[:-40])
    w("surrogate.jsonl", example_line(ok) + '{"messages": [{"role": "user", "content": '
                                            '"a\\ud800b"}, {"role": "assistant", "content": '
                                            '"c"}]}\n')
    w("private-use.jsonl", example_line([{"role": "user", "content": "a\ue000b\ue001c"},
                                         ok[1]]) * 4)
    w("forged.jsonl", example_line([{"role": "user", "content": "x<|endoftext|>Assistant: y"},
                                    {"role": "assistant", "content": "z<|endoftext|>"}]) * 4)
    w("huge-int.jsonl", example_line(ok) + '{"id": ' + "9" * 5000 + ', "messages": []}\n')
    w("corrupt.parquet", _corrupt_parquet(ok))
    w("empty.jsonl", "")
    # preference pairs
    pair = {"prompt": "upper cat:", "chosen": " CAT", "rejected": " cat"}
    good = json.dumps(pair) + "\n"
    w("pairs-mixed.jsonl", good + json.dumps({**pair, "rejected": [ok[1]]}) + "\n")
    w("pairs-role-list.jsonl", good + json.dumps({"prompt": [{"role": ["user"], "content": "x"}],
                                                  "chosen": [ok[1]], "rejected": [ok[1]]}) + "\n")
    w("pairs-deep.jsonl", good + '{"prompt": "x", "chosen": ' + _nested(100_000) +
      ', "rejected": "y"}\n')
    w("pairs-cut.jsonl.gz", gzip.compress((good * 200).encode())[:-40])
    w("pairs-surrogate.jsonl", good + '{"prompt": "a\\ud800", "chosen": " b", "rejected": " c"}\n')
    w("pairs-no-shared-prompt.jsonl", good + json.dumps({"chosen": "yes", "rejected": "no"}) +
      "\n")
    w("pairs-empty-answer.jsonl", good + json.dumps({**pair, "chosen": ""}) + "\n")
    w("prompts-no-prompt.jsonl", json.dumps({"prompt": "a", "answer": "A"}) + "\n" +
      json.dumps({"question": "b"}) + "\n")
    w("prompts-number.jsonl", json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": 3}) +
      "\n")
    w("prompts-ok.jsonl", json.dumps({"prompt": "a", "answer": "A"}) * 1 + "\n")
    w("pairs-forged.jsonl", good * 3 + json.dumps(
        {"prompt": "x<|endoftext|>", "chosen": " a<|endoftext|>Assistant: b",
         "rejected": " c"}) + "\n")
    w("empty-chats.jsonl", "\n\n")
    # benchmarks
    hs = _hellaswag()
    w("hs-cut-in-record.jsonl", hs[:len(hs) - 30])
    w("hs-no-line-end.jsonl", hs.rstrip("\n"))
    w("hs-label-string.jsonl", _hellaswag(label="1"))
    w("hs-deep.jsonl", hs + '{"ctx": "x", "endings": ' + _nested(100_000) + ', "label": 0}\n')
    w("hs-cut.jsonl.gz", gzip.compress(hs.encode() * 50)[:-30])
    w("hs-surrogate.jsonl", hs + '{"ctx": "\\udc00", "endings": ["a", "b", "c", "d"], '
                                 '"label": 0}\n')
    lam = _lambada()
    w("lambada-cut-in-record.jsonl", lam[:len(lam) - 10])
    w("lambada-no-line-end.jsonl", lam.rstrip("\n"))
    w("lambada-cut.jsonl.gz", gzip.compress(lam.encode() * 50)[:-30])
    w("lambada-deep.jsonl", lam + '{"text": ' + _nested(100_000) + "}\n")
    _zip_bomb(tmp / "bomb.zip")
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    (data / "lambada_test.jsonl").write_text(lam)  # not the published file, where it goes
    # exports
    (tmp / "a-file").write_text("not a directory\n")


def cases() -> list[Case]:
    """Every command-line case, by surface."""
    out: list[Case] = []
    tpl = ["--chat_template", "{template}"]
    for attack in ATTACKS:
        says = "no such role here" if attack == "raise" else "template.jinja"
        out.append(Case("templates", f"chat-{attack}", ["chat", "{model}", *tpl, "--max_tokens",
                                                        "4"], says, stdin=f"{attack}\n"))
        out.append(Case("templates", f"generate-chat-{attack}",
                        ["generate", "{model}", "--chat", "--prompts", f"{{tmp}}/chat-{attack}"
                         ".jsonl", *tpl, "--length", "4"], says))
    out.append(Case("templates", "chat-syntax-error", ["chat", "{model}", "--chat_template",
                                                       "{tmp}/broken.jinja", "--max_tokens",
                                                       "4"], "broken.jinja", stdin="hi\n"))
    out.append(Case("templates", "train-chats-pow", ["train", "--dataset",
                                                     "{tmp}/train-pow.jsonl", *_train(), *tpl],
                    "template.jinja"))
    train = ["train", *_train(), "--dataset"]
    for name, says in (("role-list", "message 1 has role ['user']"),
                       ("role-object", "message 1 has role {'a': 1}"),
                       ("sharegpt-from-list", "message 1 has role ['human']"),
                       ("deep", "deep.jsonl:2: nested more than"),
                       ("cut.jsonl.gz", "cut.jsonl.gz: not a valid .gz file"),
                       ("not-gzip.jsonl.gz", "not-gzip.jsonl.gz: not a valid .gz file"),
                       ("cut.jsonl.bz2", "cut.jsonl.bz2: not a valid .bz2 file"),
                       ("surrogate", "surrogate.jsonl:2: holds a lone surrogate (\\ud800)"),
                       ("huge-int", "huge-int.jsonl:2: not a JSON record"),
                       ("corrupt.parquet", "corrupt.parquet: not a readable parquet file"),
                       ("empty", "empty.jsonl: no text to encode")):
        path = name if "." in name else f"{name}.jsonl"
        out.append(Case("data", f"train-{name}", [*train, f"{{tmp}}/{path}"], says))
        if name not in ("sharegpt-from-list", "corrupt.parquet"):  # (--prompts: "messages"
            # in JSON Lines only)
            out.append(Case("data", f"generate-chat-{name}",
                            ["generate", "{model}", "--chat", "--prompts", f"{{tmp}}/{path}",
                             "--length", "2"],
                            "no chats in the file" if name == "empty" else says))
    out.append(Case("data", "train-private-use-is-text", [*train, "{tmp}/private-use.jsonl"],
                    code=0))
    out.append(Case("data", "train-forged-turn-is-text", [*train, "{tmp}/forged.jsonl"],
                    code=0))
    dpo = [*train[:-1], "--objective", "dpo", "--reference", "precomputed", "--run_name", "dpo",
           "--dataset"]
    for name, says in (("pairs-mixed", "pairs-mixed.jsonl:2: \"prompt\", \"chosen\" and "
                                       "\"rejected\" must all be strings"),
                       ("pairs-role-list", "pairs-role-list.jsonl:2: message 1 has role "
                                           "['user']"),
                       ("pairs-deep", "pairs-deep.jsonl:2: nested more than"),
                       ("pairs-cut.jsonl.gz", "pairs-cut.jsonl.gz: not a valid .gz file"),
                       ("pairs-surrogate", "pairs-surrogate.jsonl:2: holds a lone surrogate"),
                       ("pairs-no-shared-prompt", "pairs-no-shared-prompt.jsonl:2: \"chosen\" "
                                                  "and \"rejected\" share no prompt"),
                       ("pairs-empty-answer", "pairs-empty-answer.jsonl:2: an empty chosen")):
        path = name if "." in name else f"{name}.jsonl"
        out.append(Case("preferences", f"dpo-{name}", [*dpo, f"{{tmp}}/{path}"], says))
    out.append(Case("preferences", "dpo-forged-turn-is-text", [*dpo, "{tmp}/pairs-forged.jsonl"],
                    code=0))
    out.append(Case("preferences", "dpo-on-text", [*dpo, "{tmp}/big.txt"],
                    "holds no preference pairs"))
    grpo = [*train[:-1], "--objective", "grpo", "--num_generations", "2",
            "--max_completion_length", "4", "--run_name", "grpo", "--dataset"]
    out.append(Case("preferences", "grpo-no-prompt", [*grpo, "{tmp}/prompts-no-prompt.jsonl"],
                    'prompts-no-prompt.jsonl:2: a record needs a "prompt" field'))
    out.append(Case("preferences", "grpo-prompt-number", [*grpo, "{tmp}/prompts-number.jsonl"],
                    'prompts-number.jsonl:2: "prompt" must be a string or a list of messages'))
    out.append(Case("preferences", "grpo-reward-missing", [*grpo, "{tmp}/prompts-ok.jsonl",
                                                            "--reward", "no_such_module:f"],
                    "--reward no_such_module:f: cannot import no_such_module"))
    out.append(Case("preferences", "grpo-on-pairs", [*grpo, "{tmp}/pairs-forged.jsonl"],
                    "holds preference pairs"))
    evaluate = ["evaluate", "{model}", "--task"]
    for task, name, says in (
            ("hellaswag", "hs-cut-in-record", "hs-cut-in-record.jsonl:4: the last record has no "
                                              "line end; is the file cut short?"),
            ("hellaswag", "hs-no-line-end", "hs-no-line-end.jsonl:4: the last record has no "
                                            "line end"),
            ("hellaswag", "hs-label-string", "'label' must be 0, 1, 2 or 3 (a number), not '1'"),
            ("hellaswag", "hs-deep", "hs-deep.jsonl:5: nested more than"),
            ("hellaswag", "hs-cut.jsonl.gz", "hs-cut.jsonl.gz: not a valid .gz file"),
            ("hellaswag", "hs-surrogate", "hs-surrogate.jsonl:5: holds a lone surrogate"),
            ("lambada", "lambada-cut-in-record", "lambada-cut-in-record.jsonl:4: the last record"),
            ("lambada", "lambada-no-line-end", "the last record has no line end"),
            ("lambada", "lambada-cut.jsonl.gz", "lambada-cut.jsonl.gz: not a valid .gz file"),
            ("lambada", "lambada-deep", "lambada-deep.jsonl:5: nested more than"),
            ("wikitext2", "bomb.zip", "bomb.zip: holds more than 64 MB of text")):
        path = name if "." in name else f"{name}.jsonl"
        out.append(Case("benchmarks", f"{task}-{name}", [*evaluate, task, "--data",
                                                         f"{{tmp}}/{path}"], says))
    out.append(Case("benchmarks", "lambada-not-the-published-file",
                    [*evaluate, "lambada", "--data_dir", "{tmp}/data"],
                    "lambada_test.jsonl: not the published lambada file"))
    for tasks in ("", ",", " , "):
        out.append(Case("benchmarks", f"lm-eval-tasks-{tasks!r}", ["lm-eval", "{model}",
                                                                    "--tasks", tasks],
                        "name at least one task"))
    for fmt, out_name in (("gguf", "model.gguf"), ("onnx", "onnx"), ("hf", "hf"),
                          ("release", "tf")):
        export = ["export", "{model}"]
        fmt_flags = ["--format", fmt]
        out.append(Case("exports", f"{fmt}-under-a-file", [*export, f"{{tmp}}/a-file/{out_name}",
                                                           *fmt_flags],
                        "a part of the path is a file, not a directory"))
        out.append(Case("exports", f"{fmt}-read-only", [*export, f"{{ro}}/{out_name}",
                                                        *fmt_flags],
                        "the file system is read-only", needs="mount"))
        out.append(Case("exports", f"{fmt}-disk-full", [*export, f"{{full}}/{out_name}",
                                                        *fmt_flags],
                        f"{out_name}: no space left on device", needs="mount",
                        untouched=[f"{{full}}/{out_name}"]))
    out.append(Case("exports", "npz-disk-full",
                    ["encode", "--model_dir", "{model}", "{tmp}/big.txt", "{full}/out.npz"],
                    "out.npz: no space left on device", needs="mount",
                    untouched=["{full}/out.npz"]))
    return out


def _train() -> list[str]:
    return ["--model_dir", "{model}", "--init", "fresh", "--max_steps", "1", "--batch_size", "1",
            "--sample_every", "0", "--save_every", "0", "--print_every", "1"]


# Server requests: (name, path, body: JSON-able, or bytes sent as they are; want status).
def requests_() -> list[tuple[str, str, object, int]]:
    out = [(f"chat-{a}", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": a}], "max_tokens": 2}, 400)
           for a in ATTACKS]
    out += [
        ("body-nesting-100k", "/v1/completions", b'{"prompt": ' +
         _nested(100_000).encode() + b"}", 400),
        ("prompt-nesting-50k", "/v1/completions", b'{"prompt": ' + _nested(50_000).encode() +
         b', "max_tokens": 2}', 400),
        ("messages-nesting-100k", "/v1/chat/completions", b'{"messages": ' +
         _nested(100_000).encode() + b"}", 400),
        ("content-surrogate", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}', 400),
    ]
    return out


REQUESTS = requests_()


# --- running a case as a command in its own process (the script) ---------------------------

def run_command(case: Case, python: str, src: Path, places: dict, timeout: float) -> str:
    """'ok' or what went wrong, running ``python -m gpt2 ...`` against ``src``."""
    import subprocess

    import bounded

    argv = [a.format(**places) for a in case.argv]
    env = {**os.environ, "PYTHONPATH": str(src), "GPT2_CACHE": str(places["tmp"] + "/cache")}
    start = time.time()
    with bounded.Proc([python, "-m", "gpt2", *argv], env=env, cwd=places["tmp"],
                      input=case.stdin or "") as proc:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"still running after {timeout:.0f} s"  # (leaving the block kills it)
        done = proc.finish(timeout=30)
    return verdict(case, done.returncode, done.stderr, time.time() - start, places)


def verdict(case: Case, code: int, stderr: str, seconds: float, places: dict) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and "it/s]" not in ln
             and not ln.startswith(("encoding ", "tokenizing ", "warning: "))]
    if "Traceback" in stderr:
        return "traceback: " + (lines[-1] if lines else "")
    if case.code == 0:
        return "ok" if code == 0 else f"exit {code}: {lines[-1] if lines else ''}"
    if code != case.code:
        return f"exit {code}, not {case.code}: {lines[-1] if lines else ''}"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if len(errors) != 1 or case.says not in errors[0]:
        return f"not one line saying {case.says!r}: {errors or lines[-3:]}"
    if seconds > 15:
        return f"took {seconds:.0f} s"
    left = [p for p in case.untouched if Path(p.format(**places)).exists()]
    if left:
        return f"left {left[0]} behind"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--timeout", type=float, default=40)
    p.add_argument("--only", default="", help="the cases whose surface:name holds this")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_hostile import make_places  # noqa: E402 (the fixtures' own builder)

    totals: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as root:
        places, cleanup = make_places(Path(root))
        try:
            for case in cases():
                if (case.needs and not places.get("mounted")) or \
                        args.only not in f"{case.surface}:{case.name}":
                    continue
                got = run_command(case, sys.executable, Path(args.src), places, args.timeout)
                counts = totals.setdefault(case.surface, [0, 0])
                counts[0] += 1
                counts[1] += got == "ok"
                print(f"{case.surface:11} {case.name:40} {got}", flush=True)
        finally:
            cleanup()
    for surface, (n, good) in totals.items():
        print(f"{surface}: {good} of {n} clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark tasks scored as their reference implementations score them.

    rows = read_hellaswag("hellaswag_val.jsonl")            # rowanz's jsonl, checked
    scores = score("hellaswag", model, encoder, rows)        # {"acc": ..., "acc_norm": ...}
    read, sums = TASKS["wikitext2"]                          # by --task name; sums add up

**LAMBADA** (OpenAI's ``lambada_test.jsonl``, as lm-evaluation-harness's ``lambada_openai``):
the context is the text without its last word, the target ``" " + last word``, tokenized as
the harness's Hugging Face backend does (the whole text, then cut after the context's
tokens). ``acc``: every target token is the greedy prediction; ``perplexity``: exp of minus
the mean (over examples) of the target's summed log-likelihood.

**HellaSwag** (completion style, as build-nanogpt's and llm.c's ``hellaswag.py``): each of the
four endings is appended to the context as ``" " + ending``; the model's next-token loss is
summed over the ending's tokens only. ``acc``: the ending of lowest summed loss is the label;
``acc_norm``: lowest mean loss per ending token. (lm-evaluation-harness's ``hellaswag``
normalizes by characters and preprocesses the text: other numbers, 0.3114 against 0.2955
acc_norm for GPT-2 124M.)

**WikiText-2/103** (the raw test sets: ``wikitext-2-raw-v1.zip`` or its ``wiki.test.raw``):
the text is split into articles and detokenized as lm-evaluation-harness's ``wikitext`` task
does; ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` are the harness's (disjoint
windows of ``n_ctx``, per word/byte of the original article), ``token_perplexity`` a sliding
window of stride ``n_ctx / 2`` over the same articles (:func:`wikitext_sums`).

:func:`continuation_scores` and :func:`rolling_windows` are the harness's two scoring rules;
:mod:`gpt2.lm_eval` answers the harness's requests with them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import re
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.examples import records
from .errors import UserError


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _records(path: Path, limit: int | None):
    """(record, "file:line") of a task's file (the readers of example datasets: .jsonl,
    compressed too), the first ``limit`` only; a record that is not an object is one line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for row, where in itertools.islice(records(path), limit):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        yield row, where


def read_lambada(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """LAMBADA's records (``text``), checked: each must hold at least two words."""
    rows = []
    for row, where in _records(Path(path), limit):
        text = row.get("text")
        if not isinstance(text, str) or len(text.split(" ")) < 2:
            raise UserError(f"{where}: 'text' must be a string of at least two words")
        rows.append({"text": text})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


class Stopped(Exception):
    """A scoring pass ended early because its ``stop()`` said so (Ctrl-C in training)."""


def in_chunks(rows: list, batch_size: int, desc: str, progress: bool | None,
              stop: Callable[[], bool] | None = None):
    """``rows`` in chunks of ``batch_size``, with a progress bar (on a terminal by default);
    :class:`Stopped` is raised before a chunk when ``stop()`` is true."""
    bar = tqdm(total=len(rows), desc=desc, unit="example",
               disable=progress is False or (progress is None and not os.isatty(2)))
    for i in range(0, len(rows), batch_size):
        if stop is not None and stop():
            bar.close()
            raise Stopped
        yield rows[i:i + batch_size]
        bar.update(min(batch_size, len(rows) - i))
    bar.close()


def _padded(seqs: list[list[int]]) -> torch.Tensor:
    """Rows of ids, right-padded with 0 (causal attention: padding never reaches a row's own
    positions, and nothing reads its outputs)."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for r, ids in enumerate(seqs):
        tokens[r, :len(ids)] = torch.tensor(ids)
    return tokens


def encode_pair(encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split (HFLM.encode_pair): trailing spaces of the context move to the
    continuation; the continuation's ids are the whole text's after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encoder.encode(context + continuation), encoder.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_scores(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                        desc: str = "scoring", progress: bool | None = None,
                        stop: Callable[[], bool] | None = None) -> list[tuple[float, bool]]:
    """(summed log-likelihood, all greedy) of each continuation given its context, as
    lm-evaluation-harness's HF backend scores a ``loglikelihood`` request: the model sees
    ``(context + continuation)[-(n_ctx + 1):][:-1]`` and the continuation's tokens are read
    from the last positions. Longest first in batches of ``batch_size``, right-padded."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    longest = max((len(cont) for _, cont in pairs), default=0)
    if longest > n_ctx:
        raise UserError(f"a continuation of {longest} tokens does not fit the model's context "
                        f"of {n_ctx}")
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for chunk in in_chunks(order, batch_size, desc, progress, stop):
        seqs = [(pairs[i][0] + pairs[i][1])[-(n_ctx + 1):][:-1] for i in chunk]
        logits = model(_padded(seqs).to(device))
        for r, i in enumerate(chunk):  # (on the device: only two numbers come back)
            cont, end = pairs[i][1], len(seqs[r])
            logprobs = F.log_softmax(logits[r, end - len(cont):end].float(), dim=-1)
            want = torch.tensor(cont, device=device)
            out[i] = (float(logprobs.gather(1, want[:, None]).sum()),
                      bool((logprobs.argmax(-1) == want).all()))
    return out


def rolling_windows(tokens: list[int], prefix: int, n_ctx: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of ``tokens`` once, as the
    harness's ``loglikelihood_rolling`` does (``get_rolling_token_windows`` with
    ``context_len=1``, made disjoint): windows of ``n_ctx`` predicted tokens, the first one
    predicted from ``prefix`` (<|endoftext|>), each later one from the token before it; a
    shorter last window is read with the tokens before it, to fill the model's window."""
    out = []
    for start in range(0, len(tokens), n_ctx):
        end = min(start + n_ctx, len(tokens))
        out.append((tokens[end - n_ctx - 1:start] if start else [prefix], tokens[start:end]))
    return out


def context_ids(encoder, ctx: list[int], what: str) -> list[int]:
    if ctx:
        return ctx
    if encoder.eot_token is None:
        raise UserError(f"{what} with an empty context needs a tokenizer with <|endoftext|> "
                        "to start from")
    return [encoder.eot_token]


def lambada_sums(model, encoder, rows: list[dict], batch_size: int = 8,
                 progress: bool | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Correct last words and their summed log-likelihood (see the module docstring)."""
    pairs = []
    for row in rows:
        words = row["text"].split(" ")
        ctx, cont = encode_pair(encoder, " ".join(words[:-1]), " " + words[-1])
        pairs.append((context_ids(encoder, ctx, "a LAMBADA text"), cont))
    scores = continuation_scores(model, pairs, batch_size, "lambada", progress, stop)
    return {"examples": len(rows), "correct": sum(greedy for _, greedy in scores),
            "loglikelihood": sum(ll for ll, _ in scores)}


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The records of a HellaSwag jsonl file (``ctx``, four ``endings``, ``label``), checked:
    a record that is not one is one line naming the file and line."""
    rows = []
    for row, where in _records(Path(path), limit):
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str):
            raise UserError(f"{where}: 'ctx' must be a string")
        if (not isinstance(endings, list) or len(endings) != 4
                or not all(isinstance(e, str) for e in endings)):
            raise UserError(f"{where}: 'endings' must be a list of 4 strings")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
            raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3")
        rows.append({"ctx": ctx, "endings": endings, "label": label})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _ending_losses(model, rows: list[list[int]], starts: list[int], device) -> torch.Tensor:
    """[R, 2]: summed and mean next-token loss of tokens ``starts[r]:`` of each row."""
    tokens = _padded(rows)
    mask = torch.zeros(tokens.shape)
    for r, (ids, start) in enumerate(zip(rows, starts)):
        mask[r, start:len(ids)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(tokens).float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                             tokens[:, 1:].reshape(-1), reduction="none").view(len(rows), -1)
    losses = losses * mask[:, 1:]
    total = losses.sum(1)
    return torch.stack([total, total / mask[:, 1:].sum(1)], dim=1)


@torch.no_grad()
def hellaswag_sums(model, encoder, rows: list[dict], batch_size: int = 8,
                   progress: bool | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Examples whose label has the lowest summed / mean ending loss (``batch_size``
    examples, 4 rows each, per forward)."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    correct = correct_norm = 0
    for chunk in in_chunks(rows, batch_size, "hellaswag", progress, stop):
        ids, starts = [], []
        for row in chunk:
            ctx = encoder.encode(row["ctx"])
            for ending in row["endings"]:
                end = encoder.encode(" " + ending)[-(n_ctx - 1):]  # (longer: its end only)
                full = (ctx + end)[-n_ctx:]  # (a context longer than n_ctx keeps its end)
                ids.append(full)
                starts.append(len(full) - len(end))
        scores = _ending_losses(model, ids, starts, device).view(len(chunk), 4, 2).cpu()
        for row, s in zip(chunk, scores):
            correct += int(s[:, 0].argmin()) == row["label"]
            correct_norm += int(s[:, 1].argmin()) == row["label"]
    return {"examples": len(rows), "correct": correct, "correct_norm": correct_norm}


# The test split inside the raw zips (https://wikitext.smerity.com/wikitext-*-raw-v1.zip).
WIKITEXT_MEMBERS = {"wikitext2": "wikitext-2-raw/wiki.test.raw",
                    "wikitext103": "wikitext-103-raw/wiki.test.raw"}


def wikitext_pages(text: str) -> list[str]:
    """The raw text split into articles as lm-evaluation-harness's ``wikitext`` data
    (EleutherAI/wikitext_document_level): a page starts at a top-level heading (`` = Title =
    ``; ``= = Section = =`` does not start one) and keeps its lines joined by newlines; a
    whitespace-only page is dropped, except the last."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def read_wikitext(path: str | os.PathLike, limit: int | None = None,
                  task: str = "wikitext2") -> list[dict]:
    """The test articles (``page``) of WikiText's raw zip (``wikitext-2-raw-v1.zip``), of its
    ``wiki.test.raw``, or of a .jsonl of ``{"page": ...}`` records; the first ``limit`` only."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".gz", ".zst", ".bz2", ".xz"):
        pages = []
        for row, where in _records(path, limit):
            if not isinstance(row.get("page"), str):
                raise UserError(f"{where}: 'page' must be a string")
            pages.append(row["page"])
    else:
        try:
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04" or path.suffix == ".zip"
            if is_zip:  # (a zip cut short has no directory: is_zipfile says no)
                member = WIKITEXT_MEMBERS[task]
                with zipfile.ZipFile(path) as z:
                    if member not in z.namelist():
                        raise UserError(f"{path}: has no {member} (is it the {task} raw zip?)")
                    raw = z.read(member)
            else:
                raw = path.read_bytes()
            text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as e:
            raise UserError(f"{path}: not a readable zip ({e}); download it again") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); is it "
                            "wiki.test.raw?") from None
        pages = wikitext_pages(text)[:limit]
    if not any(p.strip() for p in pages):
        raise UserError(f"{path}: no text")
    return [{"page": p} for p in pages]


def wikitext_detokenize(page: str) -> str:
    """lm-evaluation-harness's ``wikitext_detokenizer``: WikiText's spaced-out punctuation,
    number separators (`` @-@ ``) and brackets put back as ordinary text."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "),
                     (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(old, new)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                     (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "),
                     (" 's", "'s")):
        s = s.replace(old, new)
    return s


def wikitext_sums(model, encoder, rows: list[dict], batch_size: int = 8,
                  progress: bool | None = None, stop: Callable[[], bool] | None = None,
                  stride: int | None = None) -> dict:
    """The detokenized articles' log-likelihoods and what they are divided by.

    ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` as lm-evaluation-harness's
    ``wikitext`` task: each article's log-likelihood from disjoint windows of ``n_ctx`` tokens
    (:func:`rolling_windows`), divided by the words (``\\s+`` splits) and UTF-8 bytes of the
    article *before* detokenization. ``token_perplexity``: a sliding window of ``n_ctx``
    tokens moving ``stride`` (default ``n_ctx // 2``) over each article, every token scored
    once with at least ``n_ctx - stride`` tokens before it (:func:`gpt2.evaluate.evaluate`);
    each article starts after <|endoftext|>, so its first token is scored too.
    """
    from .evaluate import evaluate

    n_ctx = model.config.n_ctx
    stride = stride or max(n_ctx // 2, 1)
    if not 1 <= stride <= n_ctx:
        raise UserError(f"--stride {stride}: must be in [1, n_ctx={n_ctx}]")
    eot = context_ids(encoder, [], "WikiText")[0]
    tokens = [encoder.encode(wikitext_detokenize(row["page"])) for row in rows]
    windows, owner = [], []
    for i, ids in enumerate(tokens):
        for w in rolling_windows(ids, eot, n_ctx):
            windows.append(w)
            owner.append(i)
    ll = sum(s for s, _ in continuation_scores(model, windows, batch_size, "wikitext", progress,
                                               stop))
    words = sum(len(re.split(r"\s+", row["page"])) for row in rows)
    nbytes = sum(len(row["page"].encode("utf-8")) for row in rows)
    sliding = evaluate(model, [[eot] + ids for ids in tokens if ids], n_ctx=n_ctx,
                       stride=stride, batch_size=batch_size, progress=progress)
    return {"examples": len(rows), "loglikelihood": ll, "words": words, "bytes": nbytes,
            "token_nll": sliding["loss"] * sliding["tokens"], "tokens": sliding["tokens"]}


def summarize(task: str, sums: dict) -> dict:
    """A task's metrics from its sums (which add up over shares of the rows: ranks)."""
    n, out = sums["examples"], {"task": task, **sums}
    if task == "hellaswag":
        out.update(acc=sums["correct"] / n, acc_norm=sums["correct_norm"] / n)
    elif task == "lambada":
        out.update(acc=sums["correct"] / n, perplexity=math.exp(-sums["loglikelihood"] / n))
    else:
        ll, nbytes = sums["loglikelihood"], sums["bytes"]
        out.update(word_perplexity=math.exp(-ll / sums["words"]),
                   byte_perplexity=math.exp(-ll / nbytes), bits_per_byte=-ll / nbytes / math.log(2),
                   token_perplexity=math.exp(sums["token_nll"] / sums["tokens"]))
    return out


def score(task: str, model, encoder, rows: list[dict], **options) -> dict:
    """``summarize(task, sums of the task's rows)``: e.g. ``score("lambada", model, enc, rows)``."""
    return summarize(task, TASKS[task][1](model, encoder, rows, **options))


# --task name -> (read the data file, the sums of a model's scores on its rows)
TASKS = {"hellaswag": (read_hellaswag, hellaswag_sums), "lambada": (read_lambada, lambada_sums),
         **{name: (functools.partial(read_wikitext, task=name), wikitext_sums)
            for name in WIKITEXT_MEMBERS}}

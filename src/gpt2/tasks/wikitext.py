"""WikiText-2/103 (the raw test sets: ``wikitext-2-raw-v1.zip`` or its ``wiki.test.raw``): the
text is split into articles and detokenized as lm-evaluation-harness's ``wikitext`` task does;
``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` are the harness's (disjoint
windows of ``n_ctx``, per word/byte of the original article), ``token_perplexity`` a sliding
window of stride ``n_ctx / 2`` over the same articles (:func:`wikitext_sums`).
"""

from __future__ import annotations

import functools
import math
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .scoring import context_ids, continuation_scores, rolling_windows, task_records
from .task import DataFile, Task

# The test split inside the raw zips (https://wikitext.smerity.com/wikitext-*-raw-v1.zip).
WIKITEXT_MEMBERS = {"wikitext2": "wikitext-2-raw/wiki.test.raw",
                    "wikitext103": "wikitext-103-raw/wiki.test.raw"}
# Both test splits are about 1.3 MB; anything far larger is not one (or a zip bomb).
MAX_TEXT_BYTES = 64 << 20


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


def _raw_bytes(path: Path, task: str) -> bytes:
    """The test split's bytes, from the raw zip or the file itself, at most MAX_TEXT_BYTES
    whatever a zip's directory claims."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04" or path.suffix == ".zip"
    too_big = (f"{path}: holds more than {MAX_TEXT_BYTES >> 20} MB of text; WikiText's test "
               "split is about 1.3 MB (is it the right file?)")
    if not is_zip:  # (a zip cut short has no directory: is_zipfile says no)
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UserError(too_big)
        return path.read_bytes()
    member = WIKITEXT_MEMBERS[task]
    with zipfile.ZipFile(path) as z:
        if member not in z.namelist():
            raise UserError(f"{path}: has no {member} (is it the {task} raw zip?)")
        if z.getinfo(member).file_size > MAX_TEXT_BYTES:
            raise UserError(too_big)
        with z.open(member) as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise UserError(too_big)
    return raw


def read_wikitext(path: str | os.PathLike, limit: int | None = None,
                  task: str = "wikitext2") -> list[dict]:
    """The test articles (``page``) of WikiText's raw zip (``wikitext-2-raw-v1.zip``), of its
    ``wiki.test.raw``, or of a .jsonl of ``{"page": ...}`` records; the first ``limit`` only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".gz", ".zst", ".bz2", ".xz"):
        pages = []
        for row, where in task_records(path, limit):
            if not isinstance(row.get("page"), str):
                raise UserError(f"{where}: 'page' must be a string")
            pages.append(row["page"])
    else:
        try:
            raw = _raw_bytes(path, task)
            text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError,
                NotImplementedError, RuntimeError) as e:  # (RuntimeError: encrypted)
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
    (:func:`~gpt2.tasks.scoring.rolling_windows`), divided by the words (``\\s+`` splits) and
    UTF-8 bytes of the article *before* detokenization. ``token_perplexity``: a sliding window
    of ``n_ctx`` tokens moving ``stride`` (default ``n_ctx // 2``) over each article, every
    token scored once with at least ``n_ctx - stride`` tokens before it
    (:func:`gpt2.perplexity.evaluate`); each article starts after <|endoftext|>, so its first
    token is scored too.
    """
    from ..perplexity import evaluate

    n_ctx = model.config.n_ctx
    stride = stride or max(n_ctx // 2, 1)
    if not 1 <= stride <= n_ctx:
        raise UserError(f"--stride {stride}: must be in [1, n_ctx={n_ctx}]")
    eot = context_ids(encoder, [], "WikiText")[0]
    tokens = [encoder.encode(wikitext_detokenize(row["page"])) for row in rows]
    windows = [w for ids in tokens for w in rolling_windows(ids, eot, n_ctx)]
    ll = sum(s for s, _ in continuation_scores(model, windows, batch_size, "wikitext", progress,
                                               stop))
    words = sum(len(re.split(r"\s+", row["page"])) for row in rows)
    nbytes = sum(len(row["page"].encode("utf-8")) for row in rows)
    sliding = evaluate(model, [[eot] + ids for ids in tokens if ids], n_ctx=n_ctx,
                       stride=stride, batch_size=batch_size, progress=progress)
    return {"examples": len(rows), "loglikelihood": ll, "words": words, "bytes": nbytes,
            "token_nll": sliding["loss"] * sliding["tokens"], "tokens": sliding["tokens"]}


def wikitext_metrics(sums: dict) -> dict:
    ll, nbytes = sums["loglikelihood"], sums["bytes"]
    return {"word_perplexity": math.exp(-ll / sums["words"]),
            "byte_perplexity": math.exp(-ll / nbytes), "bits_per_byte": -ll / nbytes / math.log(2),
            "token_perplexity": math.exp(sums["token_nll"] / sums["tokens"])}


TASKS = tuple(Task(
    name, functools.partial(read_wikitext, task=name), wikitext_sums, wikitext_metrics,
    ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
    DataFile(f"https://wikitext.smerity.com/{file}", file, size, sha256),
    about=f"{name}'s word, byte and sliding-window token perplexity (the first two as the "
          "harness's wikitext)", options=("stride",))
    for name, file, size, sha256 in (
        ("wikitext2", "wikitext-2-raw-v1.zip", 4721645,
         "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"),
        ("wikitext103", "wikitext-103-raw-v1.zip", 191984949,
         "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794")))

"""Fetch a released GPT-2 model into ``models/<name>/`` (the library of ``gpt2 download``).

    python download_model.py 124M                        # the seven OpenAI release files
    python download_model.py 355M --models_dir ~/models
    python download_model.py 124M --base_url https://my.mirror/gpt-2
    python download_model.py 774M --source huggingface    # config.json + model.safetensors + ...

    from gpt2.files.download import download_model
    path = download_model("124M")                         # -> Path("models/124M")
    download_checked(url, Path("data/x.jsonl"), size, sha256)   # any file with a published hash

Unlike the original script this one survives bad networks: every file streams into
``<file>.part``, failed requests are retried with exponential back-off, a retry (or a later run)
resumes the part with an HTTP ``Range`` request, and the final name appears only when the file
is complete, so a file under its final name is always whole. Files already complete are skipped.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

from ..errors import UserError
from .checksums import sha256_of
from .paths import ALIASES, MODELS, resolve_alias

RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"  # reference-spec §5
HUGGINGFACE_URL = "https://huggingface.co"
RELEASE_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                 "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
HUGGINGFACE_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
                     "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
# (file, required): the loader reads vocab.json + merges.txt; tokenizer.json is a convenience.
HUGGINGFACE_FILES = (("config.json", True), ("model.safetensors", True), ("vocab.json", True),
                     ("merges.txt", True), ("tokenizer.json", False))

CHUNK_SIZE = 1 << 20
TIMEOUT = (10, 60)  # seconds: (connect, between two reads of the body)
BACKOFF_SECONDS = 1.0  # first retry delay, doubled on each failure; tests set it to 0


class _Retryable(Exception):
    """A failure worth another try: 5xx, a body cut short, a size that does not add up."""


def canonical_name(model: str, base_url: str | None = None) -> str:
    """The folder name for ``model`` (aliases resolved); refuses unsafe or unknown names."""
    if (not model or model in (".", "..") or "/" in model or "\\" in model or "\0" in model
            or os.path.isabs(model)):
        raise UserError(f"model name {model!r}: must be a plain name such as 124M "
                        "(no '/', '\\' or '..'; it becomes a folder inside --models_dir)")
    name = resolve_alias(model)
    if name not in MODELS and base_url is None:
        raise UserError(f"unknown model {model!r}: choose one of {', '.join(MODELS)} (old "
                        f"names {', '.join(ALIASES)} also work), or --base_url for a mirror")
    return name


def file_urls(name: str, source: str = "release",
              base_url: str | None = None) -> list[tuple[str, str, bool]]:
    """``(file, url, required)`` for every file of model ``name`` (a canonical name)."""
    if source == "release":
        base = (base_url or RELEASE_URL).rstrip("/")
        return [(f, f"{base}/models/{name}/{f}", True) for f in RELEASE_FILES]
    if source == "huggingface":
        base = (base_url or HUGGINGFACE_URL).rstrip("/")
        # A mirror may host repos we do not know: then the name is the repo.
        repo = HUGGINGFACE_REPOS.get(name, name)
        return [(f, f"{base}/{repo}/resolve/main/{f}", req) for f, req in HUGGINGFACE_FILES]
    raise UserError(f"--source {source!r}: choose release or huggingface")


def _session() -> requests.Session:
    s = requests.Session()
    # A gzip-encoded body would make Content-Length disagree with the bytes we write.
    s.headers.update({"Accept-Encoding": "identity", "User-Agent": "gpt2-download"})
    return s


def _remote_size(session: requests.Session, url: str) -> int | None:
    """Content-Length from a HEAD request, or None when it cannot be known cheaply."""
    try:
        r = session.head(url, allow_redirects=True, timeout=TIMEOUT)
    except requests.RequestException:
        return None
    length = r.headers.get("Content-Length")
    return int(length) if r.status_code == 200 and length and length.isdigit() else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200); total None if ``*``."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _why(e: Exception) -> str:
    """The useful part of a network error (requests nests urllib3's retry wrapper around it)."""
    reason = e.args[0] if isinstance(e, requests.RequestException) and e.args else e
    return str(getattr(reason, "reason", reason))


def _attempt(session: requests.Session, url: str, part: Path, desc: str) -> bool:
    """One GET into ``part``, resuming what is there. True when the part is complete."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 404:
            raise UserError(f"{url}: not found (HTTP 404)")
        if r.status_code == 416:
            # Asked for bytes past the end: the part is whole if its size is the file's size.
            _, total = _content_range(r.headers.get("Content-Range"))
            if total is not None and have == total:
                return True
            part.unlink()
            raise _Retryable(f"HTTP 416 for a {have}-byte partial file; starting over")
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retryable(f"HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Retryable(f"server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        elif r.status_code == 200:
            # A server that ignores Range sends the whole file: start the part over.
            have, mode = 0, "wb"
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise UserError(f"{url}: HTTP {r.status_code} {r.reason}")
        with open(part, mode) as f, tqdm(desc=f"Fetching {desc}", total=total, initial=have,
                                         unit="B", unit_scale=True, unit_divisor=1024,
                                         ncols=100, leave=True) as bar:
            for chunk in r.iter_content(CHUNK_SIZE):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise _Retryable(f"got {size} bytes, expected {total}; starting over")
    return True


def fetch(session: requests.Session, url: str, dest: Path, retries: int = 5,
          required: bool = True) -> bool:
    """Download ``url`` to ``dest`` unless already there; False if optional and absent (404)."""
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        # Our own files get their final name only when whole; the HEAD check catches files
        # cut short by the original downloader (which wrote in place) or changed upstream.
        size, have = _remote_size(session, url), dest.stat().st_size
        if size is None or size == have:
            print(f"{dest.name}: already complete, skipped", file=sys.stderr)
            return True
        if have < size:
            os.replace(dest, part)  # resume it
        else:
            dest.unlink()
    failures, last = 0, None
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _attempt(session, url, part, dest.name):
                break
        except UserError:
            if not required and not part.exists():
                print(f"{dest.name}: not on the server (optional), skipped", file=sys.stderr)
                return False
            raise
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as e:
            raise UserError(f"{url}: bad URL ({e}); check --base_url") from None
        except (_Retryable, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            last = _why(e)
            # Attempts that moved the file forward do not count: a flaky link resumes to the end.
            failures = 0 if part.exists() and part.stat().st_size > before else failures + 1
            if failures >= retries:
                raise UserError(f"{dest.name}: download failed after {retries} tries from {url} "
                                f"({last}); run again to resume") from None
            delay = BACKOFF_SECONDS * 2 ** max(failures - 1, 0)
            print(f"{dest.name}: {last}; retrying in {delay:.0f}s", file=sys.stderr)
            time.sleep(delay)
    os.replace(part, dest)
    return True


def download_checked(url: str, dest: Path, size: int, sha256: str, retries: int = 5) -> Path:
    """Fetch ``url`` to ``dest`` with the model download's resume and retries, then check its
    sha256 against the published one; a file that does not match is moved to ``<file>.bad``
    (kept for a look) and the error says so. A file already there with the right sha256 needs
    no network; a whole one that does not match is moved aside and fetched again."""
    if retries < 1:
        raise UserError(f"--retries {retries}: must be at least 1")
    if dest.is_file():
        if dest.stat().st_size == size and sha256_of(dest) == sha256:
            print(f"{dest}: already downloaded (sha256 checked)", file=sys.stderr)
            return dest
        if dest.stat().st_size >= size:  # not the published file: fetch it anew
            os.replace(dest, dest.with_name(dest.name + ".bad"))
            print(f"{dest}: not the published file; moved to {dest.name}.bad, downloading it "
                  "again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _session() as session:
        fetch(session, url, dest, retries=retries)  # (a shorter file is resumed)
    got = sha256_of(dest)
    if got != sha256:
        bad = dest.with_name(dest.name + ".bad")
        os.replace(dest, bad)
        raise UserError(f"{dest}: sha256 {got} is not the published {sha256}; moved to {bad} "
                        "(run again to download it anew)")
    return dest


def download_model(model: str, models_dir: str | os.PathLike = "models",
                   base_url: str | None = None, source: str = "release", retries: int = 5) -> Path:
    """Fetch ``model`` (124M, 355M, 774M, 1558M, or 117M/345M) into ``models_dir/<name>``.

    ``source="release"`` gets OpenAI's TensorFlow checkpoint files, ``"huggingface"`` the same
    weights as safetensors. ``base_url`` points at a mirror (for either source). ``retries`` is
    the number of tries per file in a row without progress. Returns the model directory.
    """
    if retries < 1:
        raise UserError(f"--retries {retries}: must be at least 1")
    name = canonical_name(model, base_url)
    if name != model:
        print(f"note: {model} is the old name of {name}; downloading into {name}", file=sys.stderr)
    urls = file_urls(name, source, base_url)
    out = Path(os.path.expandvars(os.path.expanduser(os.fspath(models_dir)))) / name
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _session() as session:
            for file, url, required in urls:
                fetch(session, url, out / file, retries=retries, required=required)
    except UserError:
        if created and not any(out.iterdir()):
            out.rmdir()  # a typo in --base_url should not leave an empty model folder behind
        raise
    return out

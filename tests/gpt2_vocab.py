"""GPT-2's real vocabulary for tests, rebuilt offline from a PyPI package.

The openai-whisper *source* distribution ships ``whisper/assets/gpt2.tiktoken``: GPT-2's 50,256
BPE ranks. From it we rebuild ``encoder.json`` and ``vocab.bpe`` in OpenAI's format (every token
of rank >= 256 is the merge of the two parts that BPE with lower ranks splits it into), which come
out byte-identical to OpenAI's files; :func:`vocab_dir` checks that with the sha256s tiktoken
pins. Built once, cached under ``$GPT2_TEST_CACHE`` (default ``<repo>/.cache``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
WHISPER_SDIST = "openai-whisper==20250625"

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GPT2_TEST_CACHE", REPO / ".cache"))


def _bytes_to_unicode() -> dict[int, str]:
    # Independent of gpt2.encoder on purpose: this fixture checks the encoder.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _tiktoken_ranks() -> dict[bytes, int]:
    path = CACHE / "gpt2.tiktoken"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 ":all:", WHISPER_SDIST, "-d", tmp],
                check=True, timeout=600,  # (output not captured: nothing else can hold it)
            )
            (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers()
                              if m.name.endswith("whisper/assets/gpt2.tiktoken"))
                data = tar.extractfile(member).read()
        tmp_path = path.with_suffix(".part")
        tmp_path.write_bytes(data)
        tmp_path.rename(path)
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build(out: Path) -> None:
    ranks = _tiktoken_ranks()
    b2u = _bytes_to_unicode()
    enc = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []
    for token, rank in by_rank:
        if rank < 256:
            continue
        parts = _split(token, ranks, rank)
        assert len(parts) == 2, (token, parts)
        merges.append(f"{enc(parts[0])} {enc(parts[1])}")
    encoder = {enc(token): rank for token, rank in by_rank}
    encoder["<|endoftext|>"] = len(encoder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(encoder))
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def vocab_dir() -> Path:
    """Directory holding GPT-2's encoder.json and vocab.bpe (built on first use, by one of the
    test processes pytest-xdist runs while the others wait for it)."""
    import fcntl
    import time

    out = CACHE / "gpt2-vocab"
    if (out / "vocab.bpe").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".gpt2-vocab.lock", "w") as lock:
        deadline = time.monotonic() + 900  # (the build's own download gives up after 600 s)
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("another test process has been building the GPT-2 "
                                       "vocabulary for 15 minutes") from None
                time.sleep(0.2)
        if not (out / "vocab.bpe").exists():
            tmp = Path(tempfile.mkdtemp(dir=CACHE))
            build(tmp)
            tmp.rename(out)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    d = vocab_dir()
    print(d, sha256(d / "encoder.json") == ENCODER_JSON_SHA256,
          sha256(d / "vocab.bpe") == VOCAB_BPE_SHA256)

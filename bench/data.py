"""Data at scale: encoding throughput by input kind against raw tiktoken, and train.py's startup
cost against the size of a pre-encoded dataset, in one run.

    python bench/data.py                               # both parts, prints markdown
    python bench/data.py --part encode --mb 40         # many files, gzip, zstd, parquet
    python bench/data.py --part startup --old /tmp/old # + the same on another checkout's src/

**encode**: 40 MB of real text (Python's documentation topics: English prose) as 400 files of 100 KB, then
the same text as one ``.txt.gz``, one ``.jsonl.zst`` and one ``.parquet``; each through
``gpt2 encode`` end to end (process start, vocabulary load, reading, decompressing, writing),
against tiktoken's ``encode_ordinary_batch`` with as many threads on the same texts (encoding
only). Variants are interleaved and the best of ``--repeats`` kept.

**startup**: a sparse ``.bin`` of 1e6 ... 1e10 tokens (no disk space used) with its index, and
``train.py --max_steps 1`` on a tiny model: seconds until the first step is logged, and the
process's peak RSS. ``--old DIR`` runs the same against another checkout (e.g. before this
change), with the version-1 index it reads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import gpt2_vocab  # noqa: E402
from encode import run_measured, stdlib_texts  # noqa: E402

from gpt2.data.tokens import encode_chunk_table  # noqa: E402


def prose() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def texts_of(mb: int, n: int, kind: str) -> list[str]:
    """n documents of real text (English prose, or Python source), mb MB in all."""
    pool = "\n".join(prose() if kind == "prose" else stdlib_texts())
    while len(pool) < 2 * mb * 1_000_000 // n:
        pool += "\n" + pool
    per = mb * 1_000_000 // n
    return [pool[(i * 7919) % (len(pool) - per):][:per] for i in range(n)]


def write_inputs(root: Path, texts: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    files = root / "files"
    files.mkdir(parents=True)
    for i, t in enumerate(texts):
        (files / f"{i:04d}.txt").write_text(t)
    joined = "<|endoftext|>".join(texts)
    (root / "all.txt.gz").write_bytes(gzip.compress(joined.encode(), compresslevel=6))
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (root / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(jsonl))
    pq.write_table(pa.table({"text": texts}), root / "all.parquet", row_group_size=50)
    return {"400 files of 100 KB": files, ".txt.gz (one file)": root / "all.txt.gz",
            ".jsonl.zst (one file)": root / "all.jsonl.zst", ".parquet (one file)": root / "all.parquet"}


def raw_tiktoken(texts: list[str], threads: int) -> float:
    import tiktoken

    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("bench", pat_str=pat, mergeable_ranks=gpt2_vocab._tiktoken_ranks(),
                            special_tokens={"<|endoftext|>": 50256})
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(texts, num_threads=threads)
    return time.perf_counter() - t0


def bench_encode(args) -> list[str]:
    texts = texts_of(args.mb, 400, args.text)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    vocab = gpt2_vocab.vocab_dir()
    rows = ["| input | end to end MB/s | raw tiktoken MB/s (same run) | ratio |",
            "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="gpt2-data-") as tmp:
        inputs = write_inputs(Path(tmp), texts)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            best["raw"] = max(best.get("raw", 0), mb / raw_tiktoken(texts, args.workers))
            for name, path in inputs.items():
                seconds, _ = run_measured([
                    sys.executable, "-m", "gpt2", "encode", "--model_dir", str(vocab),
                    "--workers", str(args.workers), "--force", "--quiet", str(path),
                    str(Path(tmp) / "out.bin")])
                best[name] = max(best.get(name, 0), mb / seconds)
        for name in inputs:
            rows.append(f"| {name}, {mb:.0f} MB of text | {best[name]:.1f} | {best['raw']:.1f} | "
                        f"{best[name] / best['raw']:.2f}x |")
    return rows


# --- startup ----------------------------------------------------------------------------------

def sparse_dataset(path: Path, n_tokens: int, version: int, chunk: int = 11000) -> Path:
    with open(path, "wb") as f:
        f.truncate(n_tokens * 2)
    starts = np.arange(0, max(n_tokens - chunk, 1), chunk + 1, dtype=np.int64)
    table = np.stack([starts, np.full(len(starts), min(chunk, n_tokens), np.int64)], axis=1)
    index = {"format": "gpt2-tokens", "version": version, "dtype": "uint16",
             "n_tokens": n_tokens, "n_documents": len(table), "n_chunks": len(table),
             "n_vocab": 50257, "eot_token": 50256, "combine": 50000, "encoding": "utf-8"}
    if version == 1:
        index["chunks"] = table.tolist()
    else:
        index["chunk_table"] = encode_chunk_table(table)
    (path.parent / (path.name + ".json")).write_text(json.dumps(index))
    return path


_CHILD = r"""
import resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
sys.argv = ["train.py"] + sys.argv[2:]
import builtins
real_print = builtins.print
def watch(*a, **k):
    real_print(*a, **k)
    if a and str(a[0]).startswith("[1 |"):
        real_print("STARTUP", time.perf_counter() - t0,
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
builtins.print = watch
from gpt2.cli import script
script("train")
"""


def startup(src: Path, data: Path, model_dir: Path, root: Path, timeout: float):
    cmd = [sys.executable, "-c", _CHILD, str(src), "--dataset", str(data), "--model_dir",
           str(model_dir), "--init", "fresh", "--max_steps", "1", "--sample_every", "0",
           "--save_every", "0", "--restore_from", "fresh", "--overwrite", "--seed", "0",
           "--checkpoint_dir", str(root / "ckpt")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                              env={**os.environ, "GPT2_CACHE": str(root / "cache")})
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"STARTUP ([\d.]+) (\d+)", proc.stdout)
    if not m:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:80]}"
    return float(m.group(1)), int(m.group(2)) / 1024


def bench_startup(args) -> list[str]:
    from test_train import make_model_dir

    sizes = [int(float(s)) for s in args.tokens.split(",")]
    versions = [("this checkout", REPO / "src", 2)]
    if args.old:
        versions.insert(0, ("before", Path(args.old) / "src", 1))
    rows = ["| tokens | chunks | " + " | ".join(f"{v} s | {v} peak RSS MB" for v, _, _ in versions)
            + " |", "|---|---|" + "---|---|" * len(versions)]
    with tempfile.TemporaryDirectory(prefix="gpt2-startup-") as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root / "tiny", n_vocab=50257)
        for n in sizes:
            cells = []
            for label, src, version in versions:
                data = sparse_dataset(root / f"d{n}-v{version}.bin", n, version)
                r = startup(src, data, model_dir, root, args.timeout)
                cells.append("timeout | " if r is None else
                             f"{r} | " if isinstance(r, str) else f"{r[0]:.1f} | {r[1]:.0f}")
                data.unlink()
            rows.append(f"| {n:.0e} | {max(1, n // 11001):,} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["encode", "startup", "all"], default="all")
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--text", choices=["prose", "code"], default="prose",
                    help="Python's documentation topics, or its standard library source")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", default="1e6,1e8,1e9,9e9,1e10")
    ap.add_argument("--old", help="another checkout to measure startup against")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python "
          f"{platform.python_version()}")
    if args.part in ("encode", "all"):
        print("\n".join(bench_encode(args)), flush=True)
    if args.part in ("startup", "all"):
        print("\n".join(bench_startup(args)), flush=True)


if __name__ == "__main__":
    main()

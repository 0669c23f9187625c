"""Encoding throughput and memory: ``gpt2 encode`` end to end against raw tiktoken and a
pure-Python BPE written like the original encoder, on the same real text, in one run.

    python bench/encode.py                       # 20 MB and 200 MB corpora, writes RESULTS.md
    python bench/encode.py --sizes 20 --no-write # quick look

The corpus is Python's standard library source (real, varied text), repeated to the size asked
for: the small one as many files, the large one as a few big files so single files stream too.
Peak memory is the summed PSS of the encode process tree (parent + workers), sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import regex

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import gpt2_vocab  # noqa: E402  (GPT-2's real vocabulary, built offline)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RESULTS = REPO / "bench" / "RESULTS.md"


def stdlib_texts() -> list[str]:
    files = sorted(p for p in STDLIB.rglob("*.py") if "test" not in p.parts)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def make_corpus(root: Path, mb: int, n_files: int) -> Path:
    """~mb MB of stdlib text in n_files files, each a different rotation of the library."""
    texts = stdlib_texts()
    target = mb * 1_000_000
    per_file = target // n_files
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for i in range(n_files):
        with open(root / f"part{i:04d}.txt", "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                t = texts[k % len(texts)][:per_file - written]
                k += 7  # vary the order between files
                f.write(t)
                written += len(t.encode())
    return root


def corpus_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.iterdir()) / 1e6


def tree_rss(pid: int) -> int:
    """Summed proportional resident memory (PSS, bytes) of pid and all its descendants: forked
    workers share the parent's pages, and PSS counts each shared page once overall."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak summed RSS) of a command."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return seconds, peak


def encode_cli(corpus: Path, out: Path, vocab: Path, workers: int) -> tuple[float, int]:
    return run_measured([sys.executable, "-m", "gpt2", "encode", "--model_dir", str(vocab),
                         "--workers", str(workers), "--force", "--quiet", str(corpus), str(out)])


def encode_library(corpus: Path, out: Path, vocab: Path, workers: int, backend: str
                   ) -> tuple[float, int]:
    code = ("import sys; from gpt2.tokenizer import load_encoder; from gpt2.data import write; "
            f"write.encode_to_bin({str(corpus)!r}, {str(out)!r}, load_encoder({str(vocab)!r}), "
            f"workers={workers}, backend={backend!r}, quiet=True)")
    return run_measured([sys.executable, "-c", code])


def raw_tiktoken(corpus: Path, threads: int) -> float:
    """Seconds for tiktoken's encode_ordinary_batch over the files' texts (reading excluded)."""
    import tiktoken

    ranks = gpt2_vocab._tiktoken_ranks()
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("gpt2-bench", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    # Whole files of ~1 MB or less, as a user of tiktoken would batch them.
    texts = []
    for p in sorted(corpus.iterdir()):
        t = p.read_text(encoding="utf-8")
        texts += [t[i:i + 1_000_000] for i in range(0, len(t), 1_000_000)]
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(texts, num_threads=threads)
    return time.perf_counter() - t0


class OriginalStyleEncoder:
    """GPT-2's original encoder algorithm in pure Python: regex pre-tokenizer, byte->unicode
    table, greedy lowest-rank merge loop with a per-word cache."""

    def __init__(self, vocab_dir: Path):
        self.encoder = json.loads((vocab_dir / "encoder.json").read_text())
        lines = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_encoder = gpt2_vocab._bytes_to_unicode()
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


def pure_python(corpus: Path, vocab: Path, limit_mb: float) -> tuple[float, float]:
    """(MB encoded, seconds) for the original-style encoder on the first limit_mb of text."""
    enc = OriginalStyleEncoder(vocab)
    text = ""
    for p in sorted(corpus.iterdir()):
        text += p.read_text(encoding="utf-8")
        if len(text) > limit_mb * 1e6:
            break
    text = text[:int(limit_mb * 1e6)]
    t0 = time.perf_counter()
    enc.encode(text)
    return len(text.encode()) / 1e6, time.perf_counter() - t0


def versions() -> str:
    import numpy
    import tiktoken

    return (f"python {platform.python_version()}, tiktoken {tiktoken.__version__}, "
            f"numpy {numpy.__version__}")


def write_results(section: str) -> None:
    """Replace (or add) the "## Encoding" section of bench/RESULTS.md, leaving others alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find("\n## Encoding\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start + 1] + section + (old[end + 1:] if end >= 0 else "")
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20,200", help="corpus sizes in MB")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the small corpus (best kept)")
    ap.add_argument("--python_mb", type=float, default=2.0, help="text for the pure-Python BPE")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    vocab = gpt2_vocab.vocab_dir()
    load = os.getloadavg()[0]
    rows, mem = [], []
    sizes = [int(x) for x in args.sizes.split(",")]
    w = args.workers
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-") as tmp:
        tmp = Path(tmp)
        for mb in sizes:
            corpus = make_corpus(tmp / f"c{mb}", mb, n_files=2000 if mb <= 20 else 4)
            size = corpus_mb(corpus)
            out = tmp / f"c{mb}.bin"
            small = mb == min(sizes)
            # Variants interleaved and repeated, best rate kept: the cores are shared.
            variants = {f"`gpt2 encode` → .bin, {w} worker processes (end to end)":
                        lambda: encode_cli(corpus, out, vocab, w)}
            if small:
                variants["`gpt2 encode` → .bin, 1 process (end to end)"] = \
                    lambda: encode_cli(corpus, out, vocab, 1)
                variants[f"encode_to_bin with {w} threads instead of processes"] = \
                    lambda: encode_library(corpus, out, vocab, w, "thread")
            variants[f"raw tiktoken `encode_ordinary_batch`, {w} threads (encoding only)"] = \
                lambda: (raw_tiktoken(corpus, w), 0)
            best = {}
            for _ in range(args.repeats if small else 1):
                for name, run in variants.items():
                    seconds, peak = run()
                    rate = size / seconds
                    if rate > best.get(name, (0, 0))[0]:
                        best[name] = (rate, peak)
            first = next(iter(variants))
            mem.append((mb, size, best[first][1]))
            rows += [(name, size, rate) for name, (rate, _) in best.items()]
            if small:
                pmb, ps = pure_python(corpus, vocab, args.python_mb)
                rows.append((f"pure-Python BPE like the original encoder ({pmb:.1f} MB subset)",
                             size, pmb / ps))
            print(*rows, sep="\n", flush=True)
    table = ["| what | corpus | MB/s |", "|---|---|---|"]
    table += [f"| {what} | {mb:.0f} MB | {rate:.1f} |" for what, mb, rate in rows]
    mtable = ["| input | peak memory (PSS) of the encode process tree |", "|---|---|"]
    mtable += [f"| {size:.0f} MB | {rss / 2**20:.0f} MiB |" for _, size, rss in mem]
    cmd = "python bench/encode.py" + (f" --sizes {args.sizes}" if args.sizes != "20,200" else "")
    ratio = rows[0][2] / next(r for n, _, r in rows if n.startswith("raw"))
    section = "\n".join([
        "## Encoding", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {os.cpu_count()}-core CPU (no GPU); load average when started "
        f"{load:.1f} (other jobs share the cores, so rates are lower bounds)",
        f"- versions: {versions()}",
        f"- command: `{cmd}`",
        "- corpus: Python standard library source, repeated; GPT-2's vocabulary (50,257 ids)", "",
        *table, "",
        f"End to end (process start, vocabulary load, reading, writing included) `gpt2 encode` "
        f"runs at {ratio:.0%} of raw tiktoken's encoding-only rate on the {sizes[0]} MB corpus.", "",
        "Memory (`.bin`, streaming):", "", *mtable, "",
    ])
    print(section)
    if not args.no_write:
        write_results(section)


if __name__ == "__main__":
    main()

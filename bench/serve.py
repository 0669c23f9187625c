"""``gpt2 serve`` under load: tokens/s and latency against concurrency, batching against one at a
time, and a soak of streaming clients with the server's memory watched.

    python bench/serve.py                      # 124M shape, concurrency 1, 4, 16, 64
    python bench/serve.py --soak 60            # + 64 streaming clients for 60 s
    python bench/serve.py --capture_rounds 2 --dtype int8   # servers without/with GPT2_CAPTURE

The model is GPT-2 124M's shape with random weights and GPT-2's real vocabulary (rebuilt offline,
tests/gpt2_vocab.py), served by ``gpt2 serve`` in its own process on loopback; the clients are
threads of this process (httpx), on the same cores. Every request asks for exactly
``--tokens`` new tokens (random weights make <|endoftext|> a 1-in-50,257 draw; a request that
stops early is counted with the tokens it got).

**Batching**: the same 16 requests of 32 tokens, one after another, then all at once; the ratio
of the two wall times is what batching buys (the target: >= 3x on 2 CPU cores).
**Concurrency**: for c in 1, 4, 16, 64, c clients each send requests back to back until
max(c, 8) have finished: completion tokens per second of wall time, and per-request latency
(p50, p99). **Soak**: N streaming clients for S seconds: every stream must end with
``data: [DONE]``, and the server's RSS is sampled every 5 s (flat: after warm-up, the median of
the second half of the samples within 5% of the first half's).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from common import SHAPES, load_note, machine, median  # noqa: E402

import gpt2_vocab  # noqa: E402
from gpt2.io.model_dir import save_model  # noqa: E402
from gpt2.model import GPT  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(root: Path, shape: str) -> Path:
    torch.manual_seed(0)
    return save_model(GPT(SHAPES[shape]), root / shape, encoder_dir=gpt2_vocab.vocab_dir())


class Server:
    def __init__(self, model_dir: Path, max_batch: int, dtype: str = "fp32",
                 capture: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        if capture is not None:
            env["GPT2_CAPTURE"] = capture
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2", "serve", str(model_dir), "--port", str(self.port),
             "--max_batch", str(max_batch), "--max_queue", "1024", "--dtype", dtype], env=env)
        deadline = time.time() + 300
        while time.time() < deadline and self.proc.poll() is None:
            try:
                httpx.get(self.url + "/health", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("error: the server did not come up")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines()
                        if ln.startswith("VmRSS"))) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def complete(client: httpx.Client, url: str, tokens: int, seed: int) -> tuple[float, int]:
    """One request: (seconds, completion tokens)."""
    start = time.perf_counter()
    r = client.post(url + "/v1/completions", timeout=600, json={
        "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def closed_loop(url: str, clients: int, total: int, tokens: int) -> dict:
    """``clients`` threads send requests back to back until ``total`` have finished."""
    lock, results, next_seed = threading.Lock(), [], iter(range(total))

    def worker():
        with httpx.Client() as client:
            while True:
                with lock:
                    seed = next(next_seed, None)
                if seed is None:
                    return
                results.append(complete(client, url, tokens, seed))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(s for s, _ in results)
    return {"wall": wall, "tokens": sum(n for _, n in results), "p50": median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def soak(server: Server, clients: int, seconds: float, tokens: int) -> dict:
    stop_at = time.time() + seconds
    errors, streams, rss = [], [0], []

    def worker(i):
        with httpx.Client() as client:
            while time.time() < stop_at:
                try:
                    with client.stream("POST", server.url + "/v1/completions", timeout=600,
                                       json={"prompt": f"client {i}: {PROMPT}",
                                             "max_tokens": tokens, "stream": True}) as r:
                        lines = [ln for ln in r.iter_lines() if ln]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]":
                        errors.append(f"{r.status_code} {lines[-1:]}")
                    streams[0] += 1
                except httpx.HTTPError as e:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(server.rss_mb())
        time.sleep(5)
    for t in threads:
        t.join()
    return {"streams": streams[0], "errors": errors, "rss": rss}


def compare_capture(args: argparse.Namespace) -> int:
    """Servers without and with the captured step, alternating: tokens/s of 1 client and of 16
    (16 requests of ``--tokens`` each), and the batching ratio, per round."""
    print(f"# {args.shape} {args.dtype}, {args.tokens}-token requests, --max_batch "
          f"{args.max_batch}; each server warmed up (and its step compiled) before timing")
    print("\n| round | captured step | batching (16 one after another / all at once) | "
          "1 client tok/s | 16 clients tok/s |")
    print("|---|---|---|---|---|")
    rates: dict[str, list[float]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.shape)
        for r in range(1, args.capture_rounds + 1):
            for capture in ("0", "1"):
                server = Server(model_dir, args.max_batch, args.dtype, capture)
                try:
                    closed_loop(server.url, 4, 4, 4)
                    one = closed_loop(server.url, 1, 16, args.tokens)
                    together = closed_loop(server.url, 16, 16, args.tokens)
                finally:
                    server.stop()
                rates[capture].append(one["tokens"] / one["wall"])
                print(f"| {r} | {'on' if capture == '1' else 'off'} | {one['wall']:.1f} / "
                      f"{together['wall']:.1f} s: {one['wall'] / together['wall']:.1f}x | "
                      f"{rates[capture][-1]:.1f} | "
                      f"{together['tokens'] / together['wall']:.1f} |", flush=True)
    print(f"\n1 client, captured / not, per round: "
          f"{', '.join(f'{a / b:.2f}x' for a, b in zip(rates['1'], rates['0']))}; "
          f"load after: {load_note()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="124M", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max_batch", type=int, default=64, help="the server's --max_batch")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                   help="then this long with --soak_clients streaming clients")
    p.add_argument("--soak_clients", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "int8"), help="the server's")
    p.add_argument("--capture_rounds", type=int, default=0, metavar="N",
                   help="instead: N rounds of a server without the captured step and one with "
                        "it (GPT2_CAPTURE=0/1), each timing 1 client and 16 (16 requests each)")
    args = p.parse_args(argv)
    print(f"# {machine(torch.device('cpu'), torch.get_num_threads())}")
    given = argv if argv is not None else sys.argv[1:]
    print(f"# command: python bench/serve.py {' '.join(given)}")
    print(f"# load before: {load_note()}")
    if args.capture_rounds:
        return compare_capture(args)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(make_model_dir(Path(tmp), args.shape), args.max_batch, args.dtype)
        try:
            closed_loop(server.url, 4, 4, 4)  # warm-up: first calls, allocator
            one = closed_loop(server.url, 1, 16, args.tokens)
            together = closed_loop(server.url, 16, 16, args.tokens)
            print(f"\n16 requests of {args.tokens} tokens ({args.shape}, --max_batch "
                  f"{args.max_batch}): one after another {one['wall']:.1f} s, all at once "
                  f"{together['wall']:.1f} s: batching is {one['wall'] / together['wall']:.1f}x")
            print("\n| concurrent clients | requests | completion tokens/s | p50 latency s | "
                  "p99 latency s |")
            print("|---|---|---|---|---|")
            for c in (int(x) for x in args.concurrency.split(",")):
                total = max(c, 8)
                r = closed_loop(server.url, c, total, args.tokens)
                print(f"| {c} | {total} | {r['tokens'] / r['wall']:.1f} | {r['p50']:.2f} | "
                      f"{r['p99']:.2f} |", flush=True)
            if args.soak:
                r = soak(server, args.soak_clients, args.soak, args.tokens)
                rss = r["rss"]
                # The first sample is before the first batch filled. A single sample depends on
                # where in a batch's life it lands (the caches grow each step, spikes come and
                # go), so growth is the second half's median against the first half's.
                steady = rss[1:] or rss
                half = max(1, len(steady) // 2)
                first = median(steady[:half])
                growth = (median(steady[half:] or steady) - first) / first
                print(f"\nsoak: {args.soak_clients} streaming clients for {args.soak:.0f} s: "
                      f"{r['streams']} streams, {len(r['errors'])} errors "
                      f"{json.dumps(r['errors'][:3]) if r['errors'] else ''}; server RSS MB "
                      f"every 5 s: {', '.join(f'{x:.0f}' for x in rss)} (median of the second "
                      f"half against the first: {growth:+.1%}, "
                      f"{'flat' if growth < 0.05 else 'NOT flat'})")
        finally:
            code = server.stop()
        print(f"\nthe server exited {code} on SIGTERM; load after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

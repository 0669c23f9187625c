"""What the captured decode step costs before its first token: each figure is a fresh process
(124M shape, batch 1, an 8-token prompt) timing its first ``decode`` of 2 tokens (the prompt,
then the first captured step: where tracing, compiling or loading compiled code happens),
with Inductor's cache directory empty (cold), then holding the first process's code (warm),
and without the captured step (eager).

    python bench/capture.py                 # fp32 and int8, 2 threads
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import load_note

CHILD = r"""
import json, sys, time, torch
from gpt2.model import GPT, GPTConfig
from gpt2.quant import quantize_int8
from gpt2.sampling import decode
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
model = GPT(GPTConfig()).eval()
if sys.argv[1] == "int8":
    model = quantize_int8(model)
t = time.perf_counter()
decode(model, torch.tensor([[5] * 8]), 2, temperature=0)
first = time.perf_counter() - t
t = time.perf_counter()
decode(model, torch.tensor([[5] * 8]), 65, temperature=0)
print(json.dumps({"first": first, "rate": 64 / (time.perf_counter() - t)}))
"""


def child(dtype: str, threads: int, cache: Path, capture: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), GPT2_CAPTURE=capture,
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, dtype, str(threads)], env=env,
                         capture_output=True, text=True, timeout=900, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,int8")
    args = p.parse_args(argv)
    print(f"# command: python bench/capture.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| dtype | first 2 tokens, eager s | captured, cold cache s | captured, warm cache s "
          "| tokens/s after: eager | captured |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            eager = child(dtype, args.threads, Path(tmp), "0")
            cold = child(dtype, args.threads, Path(tmp), "1")
            warm = child(dtype, args.threads, Path(tmp), "1")
        print(f"| {dtype} | {eager['first']:.2f} | {cold['first']:.1f} | {warm['first']:.1f} | "
              f"{eager['rate']:.1f} | {warm['rate']:.1f} |")
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

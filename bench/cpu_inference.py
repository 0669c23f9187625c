"""CPU decoding at batch 1: our fp32 and int8 against llama.cpp's f32 and q8_0, same run.

"ours" decodes with the captured step (gpt2.capture: compiled once, before the timed rounds),
"ours ... eager" without it. The same random 124M-shape weights (speed does not depend on the values), exported with
``gpt2 export --format gguf`` and run by llama.cpp through llama-cpp-python (built from its
PyPI source distribution: ``pip install llama-cpp-python``). Each engine feeds the same 8-token
prompt and then decodes ``--new`` tokens greedily, one at a time through its KV cache; the
figure is new tokens over the whole call (prompt included), the median of ``--rounds``
rounds that alternate the engines.

    python bench/cpu_inference.py                       # 124M, 2 threads, 64 new tokens
    python bench/cpu_inference.py --threads 4 --new 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHAPES, load_note, machine, setup

from gpt2.io.gguf_file import export_gguf
from gpt2.io.model_dir import save_model
from gpt2.model import GPT
from gpt2.quant import quantize_int8
from gpt2.sampling import sample_sequence
from gpt2.tokenizer.bpe import bytes_to_unicode


def byte_vocab(folder: Path) -> Path:
    """A byte-level tokenizer (256 bytes + <|endoftext|>): the model's other ids are padding
    in the GGUF, which decoding speed does not notice."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    vocab["<|endoftext|>"] = 256
    (folder / "encoder.json").write_text(json.dumps(vocab))
    (folder / "vocab.bpe").write_text("#version: 0.2\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="124M", help=", ".join(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="tokens decoded per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true",
                   help="also break our time per token into matmul kernels, other ops and "
                        "the rest (torch.profiler)")
    args = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama_cpp: not installed; pip install llama-cpp-python (builds from "
                 "source, ~25 min on 2 cores)")
    device = setup("cpu", args.threads)
    config = SHAPES[args.shape]
    torch.manual_seed(0)
    model = GPT(config).eval()
    ours_int8 = quantize_int8(copy.deepcopy(model))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 8)]
    context = torch.tensor([prompt])

    tmp = Path(tempfile.mkdtemp(prefix="cpu-inference-"))
    save_model(model, tmp / "model", encoder_dir=byte_vocab(tmp / "vocab"))
    llamas = {}
    for outtype in ("f32", "q8_0"):
        path = export_gguf(model, tmp / f"m-{outtype}.gguf", tmp / "model", outtype=outtype)
        llamas[outtype] = llama_cpp.Llama(str(path), n_ctx=config.n_ctx, n_batch=64,
                                          n_threads=args.threads, n_threads_batch=args.threads,
                                          logits_all=True,
                                          verbose=False)

    def ours(m, captured):
        def run():
            os.environ["GPT2_CAPTURE"] = "1" if captured else "0"
            with torch.inference_mode():
                return sample_sequence(m, args.new, context, top_k=1)[0, len(prompt):].tolist()
        return run

    def llama(llm):
        def run():
            llm.reset()
            llm.eval(prompt)
            out = []
            for _ in range(args.new):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
            return out
        return run

    engines = {"ours fp32": ours(model, True), "ours int8": ours(ours_int8, True),
               "ours fp32 eager": ours(model, False), "ours int8 eager": ours(ours_int8, False),
               "llama.cpp f32": llama(llamas["f32"]), "llama.cpp q8_0": llama(llamas["q8_0"])}
    outputs = {name: fn() for name, fn in engines.items()}  # warm-up, and the greedy tokens
    seconds = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, fn in engines.items():
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    rate = {name: args.new / float(np.median(s)) for name, s in seconds.items()}

    print(f"# {machine(device, args.threads)} | llama-cpp-python {llama_cpp.__version__}")
    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# command: python bench/cpu_inference.py {args_text}")
    print(f"# {args.shape}, random weights, batch 1, 8-token prompt + {args.new} greedy tokens, "
          f"median of {args.rounds} alternating rounds")
    print("| engine | tokens/s | vs llama.cpp f32 | vs llama.cpp q8_0 |")
    print("|---|---|---|---|")
    for name, r in rate.items():
        print(f"| {name} | {r:.1f} | {r / rate['llama.cpp f32']:.2f}x | "
              f"{r / rate['llama.cpp q8_0']:.2f}x |")
    same = outputs["ours fp32"] == outputs["llama.cpp f32"]
    print(f"\ngreedy tokens, ours fp32 = llama.cpp f32: {same}; ours int8 = llama.cpp q8_0: "
          f"{outputs['ours int8'] == outputs['llama.cpp q8_0']}")
    print(f"ours fp32 / llama.cpp f32: {rate['ours fp32'] / rate['llama.cpp f32']:.2f}x; "
          f"ours int8 / llama.cpp q8_0: {rate['ours int8'] / rate['llama.cpp q8_0']:.2f}x")
    if args.profile:
        profile(engines, rate, args.new + len(prompt), args.new)
    print(f"# {load_note()}")
    return 0


def profile(engines, rate, fed: int, new: int) -> None:
    """Where our time goes per token: the matmul kernels, the other ops, and the rest (Python
    and the framework between ops), from torch.profiler over one call of each."""
    print("\n| ours | wall ms / token | matmul kernels | other ops | Python + dispatch |")
    print("|---|---|---|---|---|")
    matmuls = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm",
               "quantized::linear_dynamic", "aten::_weight_int8pack_mm")
    for name in ("ours fp32", "ours int8", "ours fp32 eager", "ours int8 eager"):
        with torch.profiler.profile() as prof:
            engines[name]()
        stats = prof.key_averages()
        mat = sum(e.self_cpu_time_total for e in stats if e.key in matmuls) / 1e3 / fed
        ops = sum(e.self_cpu_time_total for e in stats) / 1e3 / fed - mat
        wall = 1e3 / rate[name] * new / fed
        print(f"| {name} | {wall:.2f} | {mat:.2f} | {ops:.2f} | {wall - mat - ops:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

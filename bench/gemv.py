"""fp32 (and int8) matrix-vector speed for the 124M decode step, against the machine's memory
bandwidth: every weight of a one-token step (12 blocks' four matrices and the head, 494 MB in
fp32, each a separate tensor, so nothing stays in cache between uses) multiplied by one row,
through each kernel PyTorch offers on a CPU; GB/s = weight bytes read / time.

    python bench/gemv.py                   # 2 threads
    python bench/gemv.py --autotune        # + Inductor's CPU GEMM template (max-autotune)

The ceiling: reading a 512 MB tensor (``sum``) and copying it, same threads.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from common import load_note, machine, setup

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def timed(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--autotune", action="store_true")
    args = p.parse_args(argv)
    device = setup("cpu", args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for _ in range(12) for n, k in SHAPES]
    weights.append(torch.randn(50257, 768) * 0.02)
    biases = [torch.zeros(w.size(0)) for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    xs = {k: torch.randn(1, k) for k in (768, 3072)}

    def run(kernel):
        def go():
            for w, b in zip(weights, biases):
                kernel(xs[w.size(1)], w, b)
        return go

    big, dst = torch.ones(128 * 2**20), torch.zeros(128 * 2**20)  # 512 MB each, touched
    rows = [("read (sum of 512 MB)", big.numel() * 4, timed(lambda: big.sum(), args.rounds)),
            ("copy (512 MB read + 512 MB written)", big.numel() * 8,
             timed(lambda: dst.copy_(big), args.rounds))]
    del big, dst
    kernels = {
        "ATen F.linear (MKL sgemm)": lambda x, w, b: F.linear(x, w, b),
        "torch.mv (MKL sgemv)": lambda x, w, b: torch.mv(w, x[0]),
        "oneDNN matmul (what decoding uses)":
            lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
    }
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    lookup = {id(w): q for w, q in zip(weights, packed)}
    kernels["oneDNN, weights reordered for it"] = lambda x, w, b: \
        torch.ops.mkldnn._linear_pointwise(x, lookup[id(w)], b, "none", [], "")
    transposed = {id(w): w.t().contiguous() for w in weights}
    kernels["x @ W^T stored [in, out] (row-major GEMV)"] = lambda x, w, b: \
        torch.addmm(b, x, transposed[id(w)])
    for name, k in kernels.items():
        rows.append((name, nbytes, timed(run(k), args.rounds)))
    del transposed, packed
    if args.autotune:
        import torch._inductor.config as inductor

        inductor.max_autotune = True
        inductor.max_autotune_gemm_backends = "CPP,ATEN"
        torch._dynamo.config.recompile_limit = 64
        # one graph per shape, the weights as its inputs (as a compiled decode step has them)
        linear = torch.compile(lambda x, w, b: F.linear(x, w, b), dynamic=False)
        with torch.no_grad():
            rows.append(("Inductor, max-autotune (CPP GEMM template or ATen, its choice)",
                         nbytes, timed(run(linear), args.rounds)))
    # int8: FBGEMM's dynamic linear (what --dtype int8 uses), a quarter of the bytes
    from gpt2.quant import Int8Linear

    int8 = []
    for w, b in zip(weights, biases):
        lin = torch.nn.Linear(w.size(1), w.size(0))
        lin.weight.data, lin.bias.data = w, b
        int8.append(Int8Linear(lin))
    del weights
    with torch.no_grad():
        def go8():
            for m in int8:
                m(xs[m.in_features])
        rows.append(("int8: FBGEMM dynamic linear (--dtype int8)", nbytes // 4,
                     timed(go8, args.rounds)))
    print(f"# {machine(device, args.threads)}")
    print(f"# command: python bench/gemv.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# one 124M decode step's weights: {nbytes / 1e6:.0f} MB fp32, median of "
          f"{args.rounds}")
    print("| what | ms | GB/s |")
    print("|---|---|---|")
    for name, b, sec in rows:
        print(f"| {name} | {sec * 1e3:.2f} | {b / sec / 1e9:.1f} |")
    print(f"# {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

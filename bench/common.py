"""Shared pieces of the benchmarks: model shapes, a twin transformers model, timing, the machine.

    from common import SHAPES, hf_twin, machine, peak_flops, timed
    model = GPT(SHAPES["124M"]); hf = hf_twin(model)        # same weights, transformers' code
    seconds = timed(lambda: step(model), warmup=1, iters=3, device=device)
    print(machine(device))                                   # CPU model, cores, versions, date

Every benchmark runs on CPU and, when one is present, on CUDA (bf16 autocast, torch.compile);
the figures it prints are meant to be pasted into bench/RESULTS.md with the command that made them.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2 import runtime  # noqa: E402
from gpt2.model import GPT, GPTConfig  # noqa: E402

# The released shapes, plus a small one that trains in milliseconds on a laptop CPU.
SHAPES = {
    "small": GPTConfig(n_vocab=50257, n_ctx=256, n_embd=256, n_head=4, n_layer=4),
    "124M": GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "6x384": GPTConfig(n_vocab=50257, n_ctx=128, n_embd=384, n_head=6, n_layer=6),
    "355M": GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPTConfig(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}

# Dense (no sparsity) bf16 peaks per chip from the vendors' data sheets, in FLOP/s, by a part
# of the name the device reports.
GPU_PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                 "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
                 "v6e": 918e12, "v5p": 459e12, "v5e": 197e12, "v5 lite": 197e12, "v4": 275e12}


def setup(device: str, threads: int = 2) -> torch.device:
    """Pin the thread count (figures are per machine, not per scheduler mood) and pick a device
    (gpt2.runtime's rule: ``auto`` is the accelerator if there is one)."""
    torch.set_num_threads(threads)
    dev = runtime.pick_device(device)
    torch.set_float32_matmul_precision("high")  # TF32 where the device has it
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu_model()
    module = torch.get_device_module(device.type)
    name = getattr(module, "get_device_name", None)
    return f"{name(device) if name else device.type} ({device.type})"


def hf_twin(model: GPT):
    """transformers' GPT2LMHeadModel with exactly ``model``'s config and weights (same device)."""
    import transformers

    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new", layer_norm_epsilon=1e-5)
    # sdpa is transformers' fastest built-in attention and the one our model uses too.
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config)
    conv1d = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        # transformers' Conv1D stores [in, out]; nn.Linear stores [out, in].
        state["transformer." + name] = t.t().contiguous() if conv1d.fullmatch(name) else t.clone()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    assert not missing, f"twin left parameters unset: {missing[:3]}"
    for name, buf in hf.named_buffers():  # non-persistent buffers (masks) are still meta
        if buf.is_meta:
            raise AssertionError(f"twin left buffer {name} unset")
    return hf.to(next(model.parameters()).device).train(model.training)


def sync(device: torch.device) -> None:
    runtime.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` for ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timed_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Like :func:`timed` for several functions, alternating them call by call.

    On a shared machine the load changes from second to second; alternating makes both sides of
    a comparison see the same load, and the best of ``iters`` is the least disturbed figure.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def load_note() -> str:
    """The 1-minute load average against the core count: figures taken under load are noisy."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    return f"load average {load:.1f} on {os.cpu_count()} cores" + (
        " (machine shared with other jobs: figures are noisy, ratios more reliable)"
        if load > 1.5 * (os.cpu_count() or 1) else "")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_peak_flops(threads: int) -> tuple[float, str]:
    """An *estimate* of the CPU's fp32 peak: cores x SIMD lanes x 2 (FMA) x FMA units x clock.

    Two FMA pipes per core is right for Zen 2-4 and Skylake-SP and later server parts; the clock
    is /proc/cpuinfo's current MHz (no turbo), so the true peak may be somewhat higher.
    """
    flags, mhz = set(), 0.0
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags else 1
    cores = min(threads, os.cpu_count() or 1)
    peak = cores * lanes * fma * 2 * mhz * 1e6
    how = (f"estimate: {cores} cores x {lanes} fp32 lanes x 2 FMA units x {'2 (FMA)' if fma == 2 else 1}"
           f" x {mhz / 1000:.2f} GHz = {peak / 1e9:.0f} GFLOP/s")
    return peak, how


def peak_flops(device: torch.device, threads: int) -> tuple[float, str]:
    """Peak FLOP/s to divide by for MFU, and where the number comes from."""
    if device.type != "cpu":
        name = device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key.lower() in name.lower():
                return value, f"{name}: data-sheet dense bf16 peak {value / 1e12:.0f} TFLOP/s"
        return float("nan"), f"{name}: peak unknown, add it to GPU_PEAK_BF16"
    return cpu_peak_flops(threads)


def machine(device: torch.device, threads: int) -> str:
    import transformers

    where = (device_name(device) if device.type != "cpu"
             else f"{cpu_model()}, {threads} threads of {os.cpu_count()} cores")
    return (f"{datetime.date.today().isoformat()} | {where} | torch {torch.__version__} | "
            f"transformers {transformers.__version__} | python {platform.python_version()}")

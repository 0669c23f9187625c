"""The one-shot accelerator check: run it once on the first GPU or TPU at hand, keep every figure.

    python bench/gpu_check.py --device cuda                         # <= 9 minutes on an H100/H200
    python bench/gpu_check.py --device tpu                          # TorchTPU on a TPU VM
    python bench/gpu_check.py --device xpu                          # an Intel GPU
    python bench/gpu_check.py --device mps                          # an Apple GPU
    python bench/gpu_check.py --device cuda --nanogpt ~/nanoGPT     # + nanoGPT's step, same shape
    python bench/gpu_check.py --device cpu --quick                  # every stage on tiny shapes

Every stage runs on every device through gpt2.runtime (torch.accelerator, the device's compile
backend and precisions); where a device cannot run one, the report says why instead. Stages
(each guarded by the time budget; a stage that fails is reported and the next one runs):

1. **train**: tokens/s, MFU (against the data sheet's dense bf16 peak, printed) and peak memory
   of a 124M training step at 1024 tokens in bf16 autocast (fp16 where the device lacks
   bfloat16), with and without ``torch.compile`` (the device's backend: TorchTPU's on a TPU),
   what train.py runs (the loss inside the forward, fused AdamW where the device has it), and
   nanoGPT's model.py on the same shape when ``--nanogpt DIR`` points at a checkout (never
   part of this project).
2. **fp16**: train.py itself, ``--precision fp16`` (autocast + gradient scaler), 20 steps:
   every loss finite, how many steps the scaler skipped. Not on a TPU (no fp16 there).
3. **sample**: new tokens/s of ``sample_sequence`` against transformers' ``generate`` at batch
   1 and 16 (top-k 40, same weights).
4. **memory**: peak memory of a 3-step fine-tune (train.py in a fresh process, batch 1 x 1024)
   of 355M/774M/1558M under each memory option, against the estimate train.py prints.
5. **packed**: tokens/s of a training step on packed rows with the dense mask and with
   FlexAttention's document mask (``--packed_attention``).

The figures are appended, dated, to bench/RESULTS.md (``--results`` elsewhere) and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import SHAPES, hf_twin, machine, peak_flops, setup

from gpt2 import runtime
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.sampling import sample_sequence

HERE = Path(__file__).resolve().parent
TINY = GPTConfig(n_vocab=512, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
# (label, train.py flags) per memory option; each adds to a plain fp32 Adam fine-tune.
MEMORY_OPTIONS = [
    ("fp32, Adam", []),
    ("bf16", ["--precision", "bf16"]),
    ("bf16 + memory saving", ["--precision", "bf16", "--memory_saving_gradients"]),
    ("bf16 + memory saving + Adafactor",
     ["--precision", "bf16", "--memory_saving_gradients", "--optimizer", "adafactor"]),
]


class Report:
    """Markdown lines, printed as they come and written out at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)


def peak_memory(device: torch.device) -> float:
    """GiB: the device allocator's peak since the last reset, or this process's peak RSS."""
    peak = runtime.max_memory_allocated(device)
    if peak is not None:
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: torch.device) -> None:
    runtime.reset_peak_memory(device)


def sync(device: torch.device) -> None:
    runtime.synchronize(device)


def mixed_precision(device: torch.device) -> str:
    """bf16 where the device has it, else fp16 (the training stage's autocast)."""
    try:
        return runtime.resolve_precision("bf16", device)
    except UserError:
        return "fp16"


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """PaLM's appendix B: 6N + 12 L E T, N the matmul parameters (all but the position table)."""
    model_params = sum(p.numel() for p in GPT(config).parameters()) - config.n_ctx * config.n_embd
    return 6 * model_params + 12 * config.n_layer * config.n_embd * seq_len


# --- 1. training step -------------------------------------------------------------------------

def _ours(config: GPTConfig, device, compile: bool):
    model = GPT(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=runtime.backend_of(device).fused_optimizer or None)
    fwd = runtime.compile_module(model, device) if compile else model
    return lambda x, y: fwd(x, targets=x), opt


def _nanogpt(config: GPTConfig, device, compile: bool, root: Path):
    sys.path.insert(0, str(root))
    try:
        import model as nano  # nanoGPT's model.py
    finally:
        sys.path.remove(str(root))
    cfg = nano.GPTConfig(block_size=config.n_ctx, vocab_size=config.n_vocab,
                         n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                         dropout=0.0, bias=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = nano.GPT(cfg).to(device).train()
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    fwd = runtime.compile_module(model, device) if compile else model
    # nanoGPT takes the targets already shifted; ours shifts inside the loss.
    return lambda x, y: fwd(x, y)[1], opt


def time_train(make, config: GPTConfig, device, batch: int, steps: int, amp) -> dict:
    reset_peak(device)
    loss_fn, opt = make()
    x = torch.randint(0, config.n_vocab, (batch, config.n_ctx),
                      generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.roll(x, -1, dims=1)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: the compile happens here
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": batch * config.n_ctx / sec, "step_ms": 1e3 * sec,
            "warmup_s": warm, "peak_gib": peak_memory(device), "loss": float(loss)}


def stage_train(args, device, report: Report) -> None:
    config = TINY if args.quick else SHAPES["124M"]
    batch, steps = (2, 3) if args.quick else (12, 20)
    precision = mixed_precision(device)
    amp = runtime.DTYPES[precision]
    peak, how = peak_flops(device, args.threads)
    fpt = flops_per_token(config, config.n_ctx)
    fused = "fused" if runtime.backend_of(device).fused_optimizer else "unfused"
    report.add(f"Training step, {'tiny' if args.quick else '124M'} shape, batch {batch} x "
               f"{config.n_ctx}, {precision} autocast, {fused} AdamW, {steps} timed steps, "
               f"compile backend {runtime.backend_of(device).compile_backend!r}. MFU peak: "
               f"{how}.", "",
               "| model | compile | tokens/s | step ms | MFU | peak GiB | warm-up s |",
               "|---|---|---|---|---|---|---|")
    impls = {"ours": lambda c: _ours(config, device, c)}
    if args.nanogpt:
        impls["nanoGPT"] = lambda c: _nanogpt(config, device, c, Path(args.nanogpt))
    results = {}
    for compile in (False, True):
        for name, make in impls.items():
            r = time_train(lambda: make(compile), config, device, batch, steps, amp)
            results[name, compile] = r
            report.add(f"| {name} | {compile} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} "
                       f"| {r['tokens_per_s'] * fpt / peak:.1%} | {r['peak_gib']:.2f} "
                       f"| {r['warmup_s']:.1f} |")
    if args.nanogpt:
        for compile in (False, True):
            ratio = results["ours", compile]["tokens_per_s"] / \
                results["nanoGPT", compile]["tokens_per_s"]
            report.add("", f"ours / nanoGPT, compile={compile}: {ratio:.2f}x")
    report.add("")


# --- 2. fp16 with the gradient scaler, through train.py ----------------------------------------

def write_run_inputs(root: Path, hparams: dict) -> tuple[Path, Path]:
    """A byte-level model directory (257 ids, any architecture) and a text to train on."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_train import make_model_dir, synthetic_text

    model_dir = make_model_dir(root / "model", **hparams)
    data = root / "data.txt"
    data.write_text(synthetic_text(60000, seed=3))
    return model_dir, data


def stage_fp16(args, device, report: Report) -> None:
    from gpt2.training import TrainConfig, train

    if "fp16" not in runtime.backend_of(device).precisions:
        report.add(f"fp16 + GradScaler: not run on {device.type}: "
                   f"{runtime.backend_of(device).what} has no fp16 autocast (its mixed "
                   "precision is bf16, measured in the train stage).", "")
        return

    shape = dict(n_ctx=64, n_embd=64, n_head=4, n_layer=2) if args.quick else \
        dict(n_ctx=256, n_embd=768, n_head=12, n_layer=12)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = write_run_inputs(root, shape)
        out = io.StringIO()
        cfg = TrainConfig(dataset=str(data), model_dir=str(model_dir), init="fresh",
                          precision="fp16", max_steps=20, batch_size=4, learning_rate=3e-4,
                          optimizer="adamw", seed=0, sample_every=0, save_every=0,
                          checkpoint_dir=str(root / "ckpt"), samples_dir=str(root / "s"),
                          device=str(device), print_every=1)
        os.environ["GPT2_CACHE"] = str(root / "cache")
        with contextlib.redirect_stdout(out):
            code = train(cfg)
        records = [json.loads(line) for line in
                   (root / "ckpt/run1/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    skipped = out.getvalue().count("non-finite loss")
    ok = code == 0 and len(losses) == 20 and all(math.isfinite(v) for v in losses)
    report.add(f"fp16 + GradScaler through train.py, {shape['n_layer']} layers x "
               f"{shape['n_embd']}, 20 steps of 4 x {shape['n_ctx']}: exit {code}, "
               f"{len(losses)} losses, all finite: {ok}; first {losses[0]:.3f}, last "
               f"{losses[-1]:.3f}; steps skipped by the scaler: {skipped}.", "")
    if not ok:
        raise RuntimeError(f"fp16 run not clean: exit {code}, losses {losses}")


# --- 3. sampling ------------------------------------------------------------------------------

def stage_sample(args, device, report: Report) -> None:
    config = TINY if args.quick else SHAPES["124M"]
    new, prompt = (8, 4) if args.quick else (128, 32)
    torch.manual_seed(0)
    ours = GPT(config).to(device).eval()
    hf = hf_twin(ours).eval()
    hf.generation_config.eos_token_id = None  # never stop early: fixed work per run
    hf.generation_config.pad_token_id = 0
    report.add(f"Sampling, {'tiny' if args.quick else '124M'}, fp32 weights, prompt {prompt} + "
               f"{new} new tokens, top-k 40 (best of 3).", "",
               "| batch | ours tokens/s | transformers tokens/s | ratio |", "|---|---|---|---|")
    for batch in (1, 16):
        context = torch.randint(0, config.n_vocab, (batch, prompt),
                                generator=torch.Generator().manual_seed(batch)).to(device)
        mask = torch.ones_like(context)

        def run_ours():
            return sample_sequence(ours, new, context, top_k=40, seed=0)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(context, attention_mask=mask, do_sample=True, top_k=40,
                                   max_new_tokens=new, min_new_tokens=new, use_cache=True)

        best = {}
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            fn()
            times = []
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            best[name] = batch * new / min(times)
        report.add(f"| {batch} | {best['ours']:,.1f} | {best['hf']:,.1f} | "
                   f"{best['ours'] / best['hf']:.2f}x |")
    report.add("")


# --- 4. memory of real fine-tunes against the estimate ------------------------------------------

_CHILD = """
import json, sys, torch
sys.argv = ["train.py"] + json.loads(sys.argv[1])
from gpt2 import runtime
from gpt2.commands.train import main
code = main(sys.argv[1:])
dev = runtime.pick_device(sys.argv[sys.argv.index("--device") + 1])
peak = runtime.max_memory_allocated(dev) or 0
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("GPU_CHECK_PEAK", json.dumps({"code": code, "device": peak, "rss": rss}))
"""


def run_finetune(root: Path, model_dir: Path, data: Path, flags: list[str], device,
                 timeout: float) -> tuple[dict, str]:
    argv = ["--dataset", str(data), "--model_dir", str(model_dir), "--init", "fresh",
            "--max_steps", "3", "--batch_size", "1", "--sample_every", "0", "--save_every", "0",
            "--checkpoint_dir", str(root / "ckpt"), "--restore_from", "fresh", "--overwrite",
            "--device", str(device), "--skip_memory_check", "--seed", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "GPT2_CACHE": str(root / "c")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=root)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_PEAK")), None)
    if line is None:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err[:160]}, proc.stdout
    return json.loads(line.split(" ", 1)[1]), proc.stdout


def stage_memory(args, device, report: Report, deadline: float) -> None:
    sizes = {"tiny": dict(n_ctx=64, n_embd=64, n_head=4, n_layer=2)} if args.quick else {
        name: dict(n_ctx=1024, n_embd=SHAPES[name].n_embd, n_head=SHAPES[name].n_head,
                   n_layer=SHAPES[name].n_layer) for name in ("355M", "774M", "1558M")}
    report.add("Fine-tune memory, train.py in a fresh process, 3 steps of 1 x n_ctx, "
               "GPT-2 vocabulary (50,257 ids): peak against the estimate train.py prints "
               "(its 'peak about', which adds 10% headroom).", "",
               "| model | options | measured peak GiB | estimate GiB | estimate / measured |",
               "|---|---|---|---|---|")
    for name, shape in sizes.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model_dir, data = write_run_inputs(root, {**shape, "n_vocab": 50257})
            # --quick: the plainest and the fullest (whose flags hold the other two's)
            options = [MEMORY_OPTIONS[0], MEMORY_OPTIONS[-1]] if args.quick else MEMORY_OPTIONS
            for label, flags in options:
                left = deadline - time.time()
                if left < 30:
                    report.add(f"| {name} | {label} | skipped: time budget spent | | |")
                    continue
                r, out = run_finetune(root, model_dir, data, flags, device, timeout=left)
                m = re.search(r"peak about ([\d.]+) (GB|MB)", out)
                est = float(m.group(1)) / (1024 if m.group(2) == "MB" else 1) if m else None
                if "error" in r:
                    report.add(f"| {name} | {label} | failed: {r['error']} | {est or '?'} | |")
                    continue
                got = (r["device"] or r["rss"]) / 2**30
                ratio = f"{est / got:.2f}" if est and got else "n/a"
                shown = f"{est:.2f}" if est is not None else "?"
                report.add(f"| {name} | {label} | {got:.2f}{'' if r['device'] else ' (RSS)'} | "
                           f"{shown} | {ratio} |")
    report.add("")


def versions(device: torch.device) -> str:
    """The device's software stack, as torch reports it (CUDA, ROCm, XPU, TorchTPU)."""
    parts = [f"{k.upper()} {v}" for k, v in (("cuda", torch.version.cuda),
                                             ("hip", torch.version.hip),
                                             ("xpu", getattr(torch.version, "xpu", None)))
             if v and device.type != "cpu"]
    if device.type == "tpu":
        import importlib.metadata

        parts.append(f"torch_tpu {importlib.metadata.version('torch_tpu')}")
    return f" ({', '.join(parts)})" if parts else ""


# --- the run ----------------------------------------------------------------------------------

# --- 5. packed rows: the dense mask against FlexAttention's document mask ----------------------

def stage_packed(args, device, report: Report) -> None:
    """A training step on packed rows (documents of 32-256 tokens in 1024-token rows, as chat
    and preference data are packed), attending through the dense [T, T] mask and through
    FlexAttention's document mask (``--packed_attention``); the same first loss both ways."""
    from gpt2.attention import flex_problem, use_document_masking

    config = TINY if args.quick else SHAPES["124M"]
    batch, steps = (2, 3) if args.quick else (12, 20)
    amp = runtime.DTYPES[mixed_precision(device)]
    g = torch.Generator().manual_seed(0)
    segments = torch.empty(batch, config.n_ctx, dtype=torch.long)
    for row in segments:
        at, doc = 0, 0
        while at < config.n_ctx:
            n = int(torch.randint(4 if args.quick else 32, 17 if args.quick else 257, (),
                                  generator=g))
            row[at:at + n] = doc
            at, doc = at + n, doc + 1
    segments = segments.to(device)
    report.add(f"Packed rows, {'tiny' if args.quick else '124M'} shape, batch {batch} x "
               f"{config.n_ctx}, {int(segments.max()) + 1} documents in a row at most, "
               f"{precision_name(amp)} autocast, eager model, {steps} timed steps.", "",
               "| attention | tokens/s | step ms | peak GiB | first loss |", "|---|---|---|---|---|")
    rates = {}
    for kind in ("dense", "flex"):
        problem = flex_problem(device) if kind == "flex" else None
        if problem:
            report.add(f"| {kind} | - | - | - | {problem} |")
            continue

        def make(kind=kind):
            torch.manual_seed(0)
            model = GPT(config).to(device).train()
            if kind == "flex":
                use_document_masking(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            return lambda x, y: model(x, targets=x, segments=segments), opt

        r = time_train(make, config, device, batch, steps, amp)
        rates[kind] = r["tokens_per_s"]
        report.add(f"| {kind} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                   f"{r['peak_gib']:.2f} | {r['loss']:.4f} |")
    if len(rates) == 2:
        report.add("", f"flex / dense: {rates['flex'] / rates['dense']:.2f}x")
    report.add("")


def precision_name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


STAGES = {"train": stage_train, "fp16": stage_fp16, "sample": stage_sample,
          "memory": stage_memory, "packed": stage_packed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=list(runtime.BACKENDS))
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script works")
    p.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout to compare against")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"),
                   help="markdown file the dated figures are appended to")
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        device = setup(args.device, args.threads)
    except UserError as e:  # an absent device: what to install, in one line
        print(f"error: {e} (--device cpu --quick tries the script)", file=sys.stderr)
        return 1
    start = time.time()
    deadline = start + args.budget
    report = Report()
    report.add(f"## GPU check: {machine(device, args.threads)}", "",
               f"`python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
               f"{versions(device)}", "")
    failed = []
    for name in args.stages.split(","):
        if time.time() > deadline - 20:
            report.add(f"Stage {name}: skipped, the time budget is spent.", "")
            continue
        t0 = time.time()
        try:
            fn = STAGES[name]
            fn(args, device, report, deadline) if name == "memory" else fn(args, device, report)
        except Exception as e:  # report it and go on: one broken stage must not hide the rest
            failed.append(name)
            report.add(f"Stage {name} failed: {type(e).__name__}: {str(e)[:300]}", "")
            traceback.print_exc()
        report.add(f"(stage {name}: {time.time() - t0:.0f} s)", "")
    report.add(f"Total {time.time() - start:.0f} s.", "")
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(report.lines) + "\n")
    print(f"appended to {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

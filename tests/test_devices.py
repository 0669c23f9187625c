"""Devices beyond the CPU: the choice logic of gpt2.runtime (the one module that knows devices)
and its error paths, on a machine that has none of them.

No CUDA, XPU, MPS or TPU is here: an accelerator is simulated where torch's device-generic API
(``torch.accelerator``) answers, and what each backend row decides (precision, compile backend,
collective, fused optimizer) is checked against the table. What has never run on real hardware
is listed in README's Devices section.
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import runtime
from gpt2.errors import UserError
from test_bad_input import model_dir, run
from test_train import synthetic_text

@pytest.fixture
def accelerator(monkeypatch):
    """Pretend torch found ``count`` devices of ``kind`` (what torch.accelerator reports)."""
    def fake(kind: str, count: int = 4, bf16: bool = True) -> None:
        monkeypatch.setattr(runtime, "_accelerator", lambda: torch.device(kind))
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
        monkeypatch.setattr(runtime, "_has_bf16", lambda device: bf16)
    return fake


def one_line(argv: list[str]) -> tuple[int, str]:
    code, err, _ = run(argv)  # the CLI in-process, stderr captured
    return code, err.strip()


# --- every command: an absent device is one line that says what to install ------------------

COMMANDS = {
    "sample": lambda m, data: ["sample", "--model_dir", str(m), "--nsamples", "1", "--length", "2"],
    "interact": lambda m, data: ["interact", "--model_dir", str(m)],
    "generate": lambda m, data: ["generate", str(m), "--length", "2"],
    "evaluate": lambda m, data: ["evaluate", str(m), "--dataset", str(data)],
    "serve": lambda m, data: ["serve", str(m), "--port", "1"],
    "train": lambda m, data: ["train", "--dataset", str(data), "--model_dir", str(m),
                              "--max_steps", "1"],
}
SAYS = {
    "cuda": "it needs a CUDA (or ROCm) build of torch",
    "cuda:1": "it needs a CUDA (or ROCm) build of torch",
    "xpu": "https://download.pytorch.org/whl/xpu",
    "mps": "macOS 12.3+ on Apple silicon",
    "tpu": "pip install 'gpt2[tpu]'",
    "nonsense": "is not a torch device (try cpu, cuda, xpu, mps, tpu",
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_absent_device_is_one_line_in_every_command(tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = model_dir(tmp_path, "m")
    data = tmp_path / "data.txt"
    data.write_text(synthetic_text(500))
    for device, says in SAYS.items():
        code, err = one_line(COMMANDS[command](m, data) + ["--device", device])
        assert code == 1 and len(err.splitlines()) == 1, (device, err)
        assert err.startswith(f"error: --device {device}") or device == "nonsense", err
        assert says in err and "devices here: cpu" in err or device == "nonsense", err
    assert not (tmp_path / "checkpoint").exists()  # nothing written before the refusal


def test_torchtpu_installed_without_a_tpu_says_so(monkeypatch):
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name: object() if name == "torch_tpu" else None)
    with pytest.raises(UserError, match="TorchTPU is installed but found no TPU on this machine"):
        runtime.pick_device("tpu")


def test_a_device_of_another_kind_than_the_machines_is_refused_naming_what_is_here(accelerator):
    accelerator("cuda", count=2)
    with pytest.raises(UserError, match=r"--device xpu: .*devices here: cpu and cuda \(2\)"):
        runtime.pick_device("xpu")
    with pytest.raises(UserError, match="this machine has 2 cuda device"):
        runtime.pick_device("cuda:2")


# --- the choice: auto, ranks, precision, compile, collectives --------------------------------

@pytest.mark.parametrize("kind", ("cuda", "xpu", "mps"))
def test_auto_takes_the_accelerator_and_the_rank_picks_the_device(accelerator, kind):
    accelerator(kind, count=4)
    assert runtime.pick_device("auto") == torch.device(kind, 0)
    assert runtime.pick_device(None, local_rank=5) == torch.device(kind, 1)
    assert runtime.pick_device(kind, local_rank=2) == torch.device(kind, 2)
    assert runtime.pick_device("cpu", local_rank=2) == torch.device("cpu")


TPU_PROCESS = """
import torch
from gpt2 import runtime
# What TorchTPU's loader does on a TPU VM: PrivateUse1 becomes the "tpu" device type.
torch.utils.rename_privateuse1_backend("tpu")
runtime._accelerator = lambda: torch.device("tpu")
torch.accelerator.device_count = lambda: 8
assert runtime.pick_device("auto", local_rank=9) == torch.device("tpu", 1)
assert runtime.pick_device("tpu:3") == torch.device("tpu", 3)
device = torch.device("tpu", 0)
assert runtime.backend_of(device).type == "tpu"
assert runtime.resolve_precision("auto", device) == "bf16"
print("ok")
"""


def test_a_registered_tpu_is_picked_like_any_accelerator(tmp_path):
    """In a process of its own: renaming PrivateUse1 (as TorchTPU does) cannot be undone."""
    import os
    import sys

    import bounded

    src = str(runtime.__file__).rsplit("/gpt2/", 1)[0]
    done = bounded.run([sys.executable, "-c", TPU_PROCESS], timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_auto_is_the_cpu_without_an_accelerator():
    assert runtime.pick_device("auto", local_rank=3) == torch.device("cpu")


@pytest.mark.parametrize("kind,auto,refused", [
    ("cpu", "fp32", None), ("cuda", "bf16", None), ("xpu", "bf16", None),
    ("mps", "fp32", None), ("tpu", "bf16", "fp16"),
])
def test_precisions_each_device_supports(kind, auto, refused, monkeypatch):
    monkeypatch.setattr(runtime, "_has_bf16", lambda device: True)
    device = torch.device(kind) if kind in ("cpu", "cuda", "xpu", "mps") else torch.device("meta")
    # (torch has no "tpu" type without TorchTPU: the row is what is tested)
    monkeypatch.setattr(runtime, "backend_of", lambda d: runtime.BACKENDS[kind])
    assert runtime.resolve_precision("auto", device) == auto
    for precision in runtime.BACKENDS[kind].precisions:
        assert runtime.resolve_precision(precision, device) == precision
    if refused:
        with pytest.raises(UserError, match=f"--precision {refused}: not supported on"):
            runtime.resolve_precision(refused, device)


def test_a_gpu_without_bfloat16_falls_back_to_fp32_and_refuses_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "_has_bf16", lambda device: False)
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(UserError, match="does not support bfloat16; use fp16"):
        runtime.resolve_precision("bf16", torch.device("cuda"))


@pytest.mark.parametrize("kind,collective", [("cpu", "gloo"), ("cuda", "nccl"),
                                             ("xpu", "xccl"), ("tpu", "tpu")])
def test_each_device_trains_data_parallel_over_its_own_collective(kind, collective):
    assert runtime.BACKENDS[kind].collective == collective


def test_mps_runs_one_process_and_says_so():
    with pytest.raises(UserError, match="--device mps: torch.distributed has no backend"):
        runtime.collective_backend(torch.device("mps"))


def test_the_distributed_init_uses_the_devices_collective(accelerator, monkeypatch):
    from gpt2.training import distributed

    accelerator("xpu", count=2)
    monkeypatch.setattr(runtime, "use_device", lambda device: None)
    monkeypatch.setattr(distributed, "use_device", lambda device: None)
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, **kw))
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    info = distributed.init("auto", 1.0, environ=env)
    assert info.device == torch.device("xpu", 1) and seen["backend"] == "xccl"
    assert seen["rank"] == 1 and seen["world_size"] == 2


@pytest.mark.parametrize("kind,backend,default", [("cpu", "inductor", False),
                                                  ("cuda", "inductor", True),
                                                  ("xpu", "inductor", True),
                                                  ("mps", "inductor", False),
                                                  ("tpu", "tpu", True)])
def test_compile_uses_the_devices_backend(kind, backend, default, monkeypatch):
    row = runtime.BACKENDS[kind]
    assert (row.compile_backend, row.compile_by_default) == (backend, default)
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.update(kw) or module)
    monkeypatch.setattr(runtime, "backend_of", lambda d: row)
    module = torch.nn.Linear(2, 2)
    assert runtime.compile_module(module, torch.device("cpu")) is module
    assert seen == {"backend": backend}


def test_fused_adam_only_where_torch_has_it():
    from gpt2.training.optim import build_optimizer

    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, "adamw", 1e-3).defaults["fused"] is True
    assert {k for k, b in runtime.BACKENDS.items() if not b.fused_optimizer} == {"tpu"}


def test_an_accelerators_rng_state_is_saved_and_restored(accelerator, monkeypatch):
    """Keyed by the device type, one state per device; restored only onto as many devices."""
    accelerator("cuda", count=2)
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)]
    restored = []

    class Module:
        is_initialized = staticmethod(lambda: True)
        get_rng_state_all = staticmethod(lambda: states)
        set_rng_state_all = staticmethod(restored.append)

    monkeypatch.setattr(torch, "get_device_module", lambda kind: Module)
    from gpt2.training.state import rng_state, set_rng_state

    state = rng_state()
    assert len(state["cuda"]) == 2
    set_rng_state(state)
    assert [s.tolist() for s in restored[0]] == [[1, 2], [3]]
    accelerator("cuda", count=1)  # another machine: the device streams restart
    set_rng_state(state)
    assert len(restored) == 1

"""Never lose a run: SIGKILL at every rename and fsync of a save, random SIGKILLs, a full disk,
two runs on one directory, a stale lock, Ctrl-C in validation, SIGTERM while encoding.

A save has one commit point (the atomic rewrite of ``counter`` after ``model-N/`` is complete
and renamed): whatever moment a kill hits, the checkpoint ``counter`` names is one an
uninterrupted run wrote byte for byte, and resuming from it finishes with the same weights.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bounded
from gpt2.files.paths import follow_run_dir
from test_train import args, make_model_dir, synthetic_text

REPO = Path(__file__).resolve().parents[1]

# One training run in a fresh process (the harness below forks many from one).
KILLER = r"""
import os, signal, sys
target, kill_at = int(os.environ["KILL_STEP"]), int(os.environ["KILL_AT"])
import gpt2.training.run_dir as rd
state = {"active": False, "n": 0}
save = rd.RunDir.save
def watched(self, step, *a, **k):
    state["active"] = step == target
    try:
        return save(self, step, *a, **k)
    finally:
        state["active"] = False
rd.RunDir.save = watched
def counted(real):
    def call(*a, **k):
        if state["active"]:
            state["n"] += 1
            if state["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call
os.replace, os.fsync, os.rename = counted(os.replace), counted(os.fsync), counted(os.rename)
from gpt2.cli import main
print("POINTS", flush=True)
code = main(["train"] + sys.argv[1:])
print("SAVE_CALLS", state["n"], flush=True)
sys.exit(code)
"""


def env(tmp: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPT2_CACHE": str(tmp / "cache"),
            **extra}


def train(tmp: Path, argv: list[str], timeout: float = 120, **extra) -> subprocess.CompletedProcess:
    return bounded.run([sys.executable, "-c", KILLER, *argv], cwd=tmp, env=env(tmp, **{
        "KILL_STEP": "-1", "KILL_AT": "0", **extra}), timeout=timeout)


def temp_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name]


def checkpoint_bytes(ckpt: Path) -> dict:
    """What must match between two checkpoints of the same step (not the wall-clock time)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state.pop("elapsed")
    state["config"] = {k: v for k, v in state["config"].items()
                       if k not in ("max_steps", "run_name", "keep_checkpoints")}
    return {"model": (ckpt / "model.safetensors").read_bytes(),
            "optimizer": (ckpt / "optimizer.safetensors").read_bytes(), "state": state}


@pytest.fixture
def setup(tmp_path):
    model_dir = make_model_dir(tmp_path / "tiny")
    data = tmp_path / "data.txt"
    data.write_text(synthetic_text(3000))
    return tmp_path, data, model_dir


def run_args(data, model_dir, **flags) -> list[str]:
    base = dict(save_every=1, keep_checkpoints=1, dropout=0.1, noise=0.05, optimizer="adamw")
    return args(data, model_dir, **{**base, **flags})


def harness(tmp: Path, runs: list[dict], timeout: float = 600) -> list[dict]:
    """Every run forked from one process that imported torch once (tests/crash_harness.py)."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cwd": str(tmp), "runs": runs}))
    proc = bounded.run([sys.executable, str(REPO / "tests/crash_harness.py"), str(spec)],
                       env=env(tmp), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_sigkill_before_every_rename_and_fsync_of_a_save(setup):
    tmp, data, model_dir = setup
    kill = tmp / "checkpoint/kill"
    base = run_args(data, model_dir, max_steps=1, run_name="base")
    ref = run_args(data, model_dir, max_steps=4, run_name="ref", keep_checkpoints=9)
    counted, _ = harness(tmp, [{"argv": ref, "kill_step": 2}, {"argv": base}])
    points = counted["calls"] + 1  # with keep 1 the save also retires model-1: one more rename
    assert counted["exit"] == 0 and points >= 20  # per file: fsync, rename, directory fsync
    reference = {n: checkpoint_bytes(tmp / f"checkpoint/ref/model-{n}") for n in (1, 2, 4)}
    argv = run_args(data, model_dir, max_steps=4, run_name="kill")
    copy = {"copy": [str(tmp / "checkpoint/base"), str(kill)]}
    runs, resumed = [], (1, points // 2, points - 4, points - 1, points)
    for k in range(1, points + 1):
        runs.append({"argv": argv, "kill_step": 2, "kill_at": k, "setup": copy,
                     "keep": [str(kill), str(tmp / f"named/{k}")]})
        if k in resumed:  # and resuming from what the kill left finishes the run exactly
            runs.append({"argv": argv, "keep": [str(kill), str(tmp / f"done/{k}")]})
    results = iter(harness(tmp, runs))
    for k in range(1, points + 1):
        killed = next(results)
        assert killed["signal"] == signal.SIGKILL, (k, killed)
        step = int(killed["named"].split("-")[1])
        assert step in (1, 2), (k, killed)
        # the checkpoint counter names is exactly the uninterrupted run's of that step
        assert checkpoint_bytes(tmp / f"named/{k}") == reference[step], k
        if k in resumed:
            done = next(results)
            assert done["exit"] == 0 and done["named"] == "model-4", (k, done)
            assert checkpoint_bytes(tmp / f"done/{k}") == reference[4], k
            assert temp_files(kill) == [] and temp_files(tmp / "cache") == [], k
            assert sorted(p.name for p in kill.glob("model-*")) == ["model-4"]


def test_random_sigkills_then_one_full_run_give_the_uninterrupted_weights(setup):
    tmp, data, model_dir = setup
    flags = dict(max_steps=40, save_every=3, keep_checkpoints=2)
    rng = random.Random(0)
    argv = run_args(data, model_dir, run_name="kill", **flags)
    [counted] = harness(tmp, [{"argv": run_args(data, model_dir, run_name="ref", **flags)}])
    assert counted["exit"] == 0
    # Killed at random points (a backward pass, a write, a rename), each run getting at most
    # a tenth of the way: all eight are killed before the last one finishes.
    runs = [{"argv": argv, "kill_call": rng.randint(1, counted["all_calls"] // 10)}
            for _ in range(8)]
    results = harness(tmp, runs + [{"argv": argv}])
    assert results[-1]["exit"] == 0, results
    assert all(r["signal"] == signal.SIGKILL for r in results[:-1]), results
    ref, done = tmp / "checkpoint/ref/model-40", tmp / "checkpoint/kill/model-40"
    assert (ref / "model.safetensors").read_bytes() == (done / "model.safetensors").read_bytes()
    losses = [[json.loads(line).get("loss") for line in (tmp / f"checkpoint/{r}/metrics.jsonl")
               .read_text().splitlines()] for r in ("ref", "kill")]
    assert losses[0] == losses[1] and len(losses[0]) == 40
    assert temp_files(tmp / "checkpoint") == [] and temp_files(tmp / "cache") == []


# --- a full disk ----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for the first checkpoint of a tiny run, not for three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = bounded.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                       timeout=30)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
    yield mount
    bounded.run(["umount", "-l", str(mount)], timeout=30)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(setup, small_disk, monkeypatch,
                                                             capsys):
    tmp, data, model_dir = setup
    run = small_disk / "run1"
    flags = run_args(data, model_dir, max_steps=10, keep_checkpoints=3)
    code, out, err = in_process(tmp, monkeypatch, capsys,
                                flags + ["--checkpoint_dir", str(small_disk)])
    assert code == 1, out[-2000:] + err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(run))}: no space left on device \(needs about "
                        r"\d+ MB, \d+ MB free\)", last), last
    assert "Traceback" not in err
    kept = follow_run_dir(run)
    assert kept != run and temp_files(small_disk) == []
    # the last checkpoint loads and resumes (once there is room again)
    from gpt2.io.model_dir import load_model

    load_model(kept)
    shutil.copytree(run, tmp / "moved/run1")
    code, _, err = in_process(tmp, monkeypatch, capsys, run_args(
        data, model_dir, max_steps=int(kept.name[6:]) + 1, keep_checkpoints=3) +
        ["--checkpoint_dir", str(tmp / "moved")])
    assert code == 0, err[-2000:]


def test_no_space_in_the_middle_of_a_save_removes_what_it_wrote(setup, small_disk,
                                                                  monkeypatch):
    """The check before a save can be beaten by another writer: then ENOSPC mid-write."""
    import torch

    from gpt2.errors import UserError
    from gpt2.model import GPT, GPTConfig
    from gpt2.training.run_dir import RunDir

    monkeypatch.setattr(RunDir, "check_space", lambda self, needed: None)
    model = GPT(GPTConfig(n_vocab=97, n_ctx=64, n_embd=128, n_head=4, n_layer=2))
    big = {"m": torch.zeros(600_000)}  # 2.4 MB of optimizer state: does not fit
    with pytest.raises(UserError, match="no space left on device"):
        RunDir(small_disk, small_disk, "run1").save(1, model, big, {}, {"step": 1}, None)
    assert list((small_disk / "run1").iterdir()) == []


@pytest.mark.parametrize("what", ["encode", "dataset cache"])
def test_disk_full_while_encoding_is_one_line_and_leaves_nothing(setup, small_disk, what):
    """encode.py's output, or the dataset cache train.py encodes into, on a full disk: one
    line (it was a traceback: numpy's tofile says 'N requested and M written', no errno)."""
    tmp, data, model_dir = setup
    big = tmp / "big.txt"
    big.write_text(synthetic_text(400_000))  # ~2.4M byte-level tokens: 4.8 MB, 1.5 MB of room
    if what == "encode":
        argv = ["-m", "gpt2", "encode", "--model_dir", str(model_dir), str(big),
                str(small_disk / "out.bin")]
        extra = {}
    else:
        argv = ["-c", KILLER, *args(big, model_dir, max_steps=1)]
        extra = {"GPT2_CACHE": str(small_disk / "cache"), "KILL_STEP": "-1", "KILL_AT": "0"}
    proc = bounded.run([sys.executable, *argv], cwd=tmp, env=env(tmp, **extra), timeout=120)
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("encoding ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    m = re.fullmatch(r"error: \S+: no space left on device \(needs about (\d+) MB, \d+ MB "
                     r"free\)", lines[-1])
    assert m and len(lines) == 1, lines  # (above it: the progress bar)
    assert 3 <= int(m.group(1)) <= 8  # 2.4M two-byte tokens
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []


# --- one run per directory ------------------------------------------------------------------

def in_process(tmp: Path, monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """``gpt2 train ARGV`` in this process, in ``tmp`` (its cache there): (code, out, err)."""
    from gpt2.cli import main

    monkeypatch.chdir(tmp)
    monkeypatch.setenv("GPT2_CACHE", str(tmp / "cache"))
    capsys.readouterr()
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_second_run_on_one_directory_is_refused_and_a_stale_lock_taken_over(setup,
                                                                             monkeypatch,
                                                                             capsys):
    tmp, data, model_dir = setup
    argv = run_args(data, model_dir, max_steps=100000, save_every=0)
    with bounded.Proc([sys.executable, "-m", "gpt2", "train", *argv], cwd=tmp,
                      env=env(tmp)) as first:
        first.wait_for(lambda line: line.startswith("Training..."), timeout=120)
        t0 = time.time()
        code, _, err = in_process(tmp, monkeypatch, capsys, argv)  # a second run
        assert code == 1 and time.time() - t0 < 15
        err = err.strip()
        assert re.fullmatch(rf"error: {re.escape(str(Path('checkpoint/run1')))} is in use by "
                            rf"process {first.pid} on \S+ \(started [\d-]+ [\d:]+\); .*", err), err
        first.popen.kill()  # SIGKILL: the lock file still names it
        first.popen.wait(timeout=30)
    lock = json.loads((tmp / "checkpoint/run1/lock").read_text())
    assert lock["pid"] == first.pid
    code, out, err = in_process(tmp, monkeypatch, capsys, run_args(data, model_dir,
                                                                  max_steps=2))
    assert code == 0, err[-2000:]
    assert f"taking over the lock left by process {first.pid}" in out
    assert (tmp / "checkpoint/run1/lock").read_text() == ""  # released


# --- signals --------------------------------------------------------------------------------

def wider(tmp: Path) -> Path:
    """A model whose forward takes ~20 ms: a pass of a few hundred batches lasts seconds."""
    return make_model_dir(tmp / "wider", n_embd=256, n_head=4, n_layer=4)


def test_ctrl_c_in_a_long_validation_stops_within_a_batch_and_saves(setup):
    tmp, data, _ = setup
    argv = [sys.executable, "-m", "gpt2", "train",
            *run_args(data, wider(tmp), max_steps=100, val_every=50, val_batch_count=600,
                      val_batch_size=8, save_every=0)]
    with bounded.Proc(argv, cwd=tmp, env=env(tmp)) as proc:
        proc.wait_for(lambda line: line.startswith("Calculating validation loss"), timeout=120)
        time.sleep(0.5)
        t0 = time.time()
        proc.signal(signal.SIGINT)
        done = proc.finish(timeout=60)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-2000:]
    assert time.time() - t0 < 6  # not the 600 batches (over 10 s)
    assert "Saving checkpoint/run1/model-0" in out
    assert (tmp / "checkpoint/run1/model-0/model.safetensors").is_file()


def test_ctrl_c_in_a_long_benchmark_stops_within_a_batch_and_saves(setup):
    tmp, data, _ = setup
    hellaswag = tmp / "hellaswag.jsonl"
    row = json.dumps({"ctx": "the city was", "endings": ["new.", "one.", "two.", "old."],
                      "label": 1})
    hellaswag.write_text((row + "\n") * 3000)
    argv = [sys.executable, "-m", "gpt2", "train",
            *run_args(data, wider(tmp), max_steps=100, eval_every=50, save_every=0,
                      eval_tasks=f"hellaswag={hellaswag}")]
    with bounded.Proc(argv, cwd=tmp, env=env(tmp)) as proc:
        proc.wait_for(lambda line: line.startswith("Scoring hellaswag (3000 examples)"),
                      timeout=120)
        time.sleep(0.5)
        t0 = time.time()
        proc.signal(signal.SIGINT)
        done = proc.finish(timeout=60)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-2000:]
    assert time.time() - t0 < 6  # not the 3000 examples (over 15 s)
    assert "Saving checkpoint/run1/model-0" in out and "hellaswag_acc" not in out
    assert (tmp / "checkpoint/run1/model-0/model.safetensors").is_file()


TWO_CTRL_C = """
import os, signal, subprocess, sys, torch
from gpt2.training.loop import StopRequest
torch.set_num_threads(1)
b = torch.randn(4000, 4000)  # one product: ~2 s on one core
with StopRequest() as stop:
    pid = os.getpid()
    kills = "; sleep 0.3; ".join([f"kill -INT {pid}"] * int(sys.argv[1]))
    subprocess.Popen(["sh", "-c", f"sleep 0.3; {kills}"])
    try:
        for _ in range(2):
            b @ b  # long kernels: the signals land inside one, Python's handler runs once after
        print("saving", stop.requested)
    except KeyboardInterrupt:
        print("aborted")
"""


@pytest.mark.parametrize("presses,says", [(1, "saving True"), (2, "aborted")])
def test_a_second_ctrl_c_aborts_even_inside_one_long_computation(tmp_path, presses, says):
    """Two Ctrl-Cs that arrive while one kernel runs (a validation batch of a big model) reach
    Python's handler as one call; the trainer counts the signals that arrived, so the second
    still aborts, as README says (two sent at the same instant are one signal: the kernel
    merges them before any process can count them)."""
    done = bounded.run([sys.executable, "-c", TWO_CTRL_C, str(presses)], cwd=tmp_path,
                       env=env(tmp_path), timeout=120)
    assert done.stdout.strip() == says, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("command", ["encode", "train"])
def test_sigterm_while_encoding_leaves_no_worker_and_no_temp_file(setup, command):
    tmp, data, model_dir = setup
    big = tmp / "big.txt"
    big.write_text(synthetic_text(3_000_000))
    cache = tmp / "cache"
    if command == "encode":
        argv = ["encode", "--model_dir", str(model_dir), "--workers", "2", str(big),
                str(tmp / "out.bin")]
    else:
        argv = ["train", *args(big, model_dir, max_steps=1)]
    with bounded.Proc([sys.executable, "-m", "gpt2", *argv], cwd=tmp, env=env(tmp)) as proc:
        deadline = time.time() + 60
        while time.time() < deadline and not _children(proc.pid):
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert workers, "the encode never started its workers"
        time.sleep(0.5)
        proc.signal(signal.SIGTERM)
        assert proc.finish(timeout=60).returncode != 0
    time.sleep(0.5)
    assert not [p for p in workers if bounded.alive(p)], "workers outlived the parent"
    assert temp_files(tmp) == [] and not (tmp / "out.bin").exists()
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []

"""Runs training many times cheaply for tests/test_crash.py: torch and gpt2 are imported once,
then every run is a fork of this process (no import per run), optionally SIGKILLed.

    python tests/crash_harness.py SPEC.json     # prints one JSON result per run

SPEC: {"cwd": dir, "runs": [{"argv": [...], "kill_step": N, "kill_at": K, "kill_call": C,
"setup": {"copy": [src, dst]}, "keep": [run_dir, dst]}]}. ``kill_step``/``kill_at``: SIGKILL
the run before the K-th os.replace/os.fsync/os.rename call of its save of step N (0 counts
them, no kill; the result's "calls"). ``kill_call``: SIGKILL it before its C-th call of any of
those or of a backward pass, anywhere in the run (the result's "all_calls" counts them): a
point anywhere in the run that a busy machine does not move, as a time would. No torch work is
done before forking.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

from pathlib import Path

import torch
import torch._dynamo  # noqa: F401 (torch.optim imports it on its first use: once here, not in
import gpt2.commands.train  # noqa: F401  every forked run, nor gpt2's own lazy imports)
import gpt2.training.run_dir as run_dir
from gpt2.cli import main
from gpt2.files.paths import follow_run_dir

STATE = {"active": False, "n": 0, "target": -1, "kill_at": 0, "all": 0, "kill_call": 0}
_save = run_dir.RunDir.save


def _watched(self, step, *a, **k):
    STATE["active"] = step == STATE["target"]
    try:
        return _save(self, step, *a, **k)
    finally:
        STATE["active"] = False


def _counted(real):
    def call(*a, **k):
        STATE["all"] += 1
        if STATE["all"] == STATE["kill_call"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if STATE["active"]:
            STATE["n"] += 1
            if STATE["n"] == STATE["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call


def child(run: dict, report: int) -> None:
    STATE.update(target=run.get("kill_step", -1), kill_at=run.get("kill_at", 0),
                 kill_call=run.get("kill_call", 0))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    code = 1
    try:
        code = main(["train", *run["argv"]])
    finally:
        os.write(report, json.dumps({"code": code, "calls": STATE["n"],
                                     "all_calls": STATE["all"]}).encode())
        os._exit(code)


def one(run: dict) -> dict:
    for src, dst in [run["setup"]["copy"]] if "setup" in run else []:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        child(run, write)
    os.close(write)
    start = time.time()
    _, status = os.waitpid(pid, 0)
    out = os.read(read, 4096)
    os.close(read)
    result = json.loads(out) if out else {}
    result["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    result["exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    result["seconds"] = time.time() - start
    if "keep" in run:  # the checkpoint the run directory names now, kept for the test
        src, dst = run["keep"]
        named = follow_run_dir(Path(src))
        result["named"] = named.name
        shutil.copytree(named, dst)
    return result


if __name__ == "__main__":
    run_dir.RunDir.save = _watched
    os.replace, os.fsync, os.rename = (_counted(os.replace), _counted(os.fsync),
                                       _counted(os.rename))
    torch.autograd.backward = _counted(torch.autograd.backward)
    spec = json.loads(open(sys.argv[1]).read())
    os.chdir(spec["cwd"])
    for run in spec["runs"]:
        print(json.dumps(one(run)), flush=True)

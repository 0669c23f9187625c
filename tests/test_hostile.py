"""Hostile inputs (tests/hostile.py's tables), each case in-process: one line, a non-zero exit,
no traceback, nothing half-written; the server answers 4xx and keeps serving others while a
hostile template is refused; a Ctrl-C or SIGTERM at any moment of encoding stops cleanly."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import bounded
import hostile
from gpt2.cli import main

REPO = Path(__file__).resolve().parents[1]


def make_places(root: Path):
    """The files, a tiny model, and (as root on Linux) a read-only and a nearly full tmpfs;
    returns (the placeholders of hostile.Case.argv, cleanup)."""
    import torch

    from gpt2.io.model_dir import save_model
    from gpt2.model import GPT, GPTConfig
    from test_train import make_model_dir, synthetic_text

    tmp = root / "case"
    tmp.mkdir()
    hostile.write_files(tmp)
    (tmp / "big.txt").write_text(synthetic_text(60_000))
    model = make_model_dir(root / "model", n_ctx=64)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(n_vocab=257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)), model)
    places = {"tmp": str(tmp), "model": str(model), "template": str(tmp / "template.jinja"),
              "ro": str(root / "ro"), "full": str(root / "full"), "mounted": False}
    mounts = []
    for name, options in (("ro", "ro,size=64k"), ("full", "size=96k")):
        (root / name).mkdir()
        if bounded.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root / name)],
                       timeout=30).returncode == 0:
            mounts.append(root / name)
    places["mounted"] = len(mounts) == 2

    def cleanup():
        for m in mounts:
            bounded.run(["umount", "-l", str(m)], timeout=30)

    return places, cleanup


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    places, cleanup = make_places(tmp_path_factory.mktemp("hostile"))
    yield places
    cleanup()


@pytest.fixture
def quick_templates(monkeypatch):
    """Templates bounded at 0.5 s here (the default is 2 s: the server's cases use it)."""
    from gpt2.tokenizer import sandbox

    monkeypatch.setattr(sandbox, "LIMITS", sandbox.Limits(seconds=0.5))


@pytest.mark.parametrize("case", hostile.cases(), ids=lambda c: f"{c.surface}:{c.name}")
def test_a_hostile_command_line_is_one_clean_line(case, places, capsys, monkeypatch,
                                                  quick_templates):
    if case.needs == "mount" and not places["mounted"]:
        pytest.skip("needs to mount a tmpfs (root on Linux)")
    monkeypatch.chdir(places["tmp"])
    monkeypatch.setenv("GPT2_CACHE", str(Path(places["tmp"]) / "cache" / case.name))
    monkeypatch.setattr(sys, "stdin", io.StringIO(case.stdin or ""))
    argv = [a.format(**places) for a in case.argv]
    start = time.time()
    try:
        code = main(argv)
    except SystemExit as e:  # (argparse)
        code = e.code
    captured = capsys.readouterr()
    got = hostile.verdict(case, code, captured.err, time.time() - start, places)
    assert got == "ok", captured.err[-3000:]
    if case.code:
        tmpdirs = [p for p in Path(places["tmp"]).rglob(".*tmp-*")]
        assert tmpdirs == []


# --- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_server(places):
    from test_serve import Server

    server = Server(Path(places["model"]), "--chat_template", places["template"])
    yield server
    server.stop()


def test_the_server_refuses_hostile_requests_with_4xx_and_keeps_serving(hostile_server):
    import httpx

    url = hostile_server.url
    slow = threading.Thread(target=lambda: httpx.post(
        url + "/v1/chat/completions", timeout=30,
        json={"messages": [{"role": "user", "content": "loops"}], "max_tokens": 2}))
    slow.start()  # a template that runs out its time limit...
    time.sleep(0.3)
    t0 = time.time()  # ...while every other client is answered at once
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and time.time() - t0 < 1.5
    slow.join(timeout=30)
    for name, path, body, status in hostile.REQUESTS:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url + path, timeout=30, headers={"Content-Type": "application/json"},
                       **kw)
        assert r.status_code == status, (name, r.text[:500])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], name
    assert hostile_server.proc.poll() is None
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_chat_without_max_tokens_fits_a_small_context(hostile_server):
    """n_ctx 64: the default reply length is what the context has left (it was min(n_ctx,
    256) new tokens, which no prompt left room for)."""
    import httpx

    r = httpx.post(hostile_server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 64 + 1


# --- Ctrl-C and SIGTERM while a dataset is being encoded ----------------------------------

@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.05), (signal.SIGINT, 0.3),
                                        (signal.SIGTERM, 0.15)])
def test_a_signal_while_encoding_stops_at_once_with_one_line(places, tmp_path, sig, delay):
    """Sent to the whole process group, as a terminal's Ctrl-C is: the run stops within
    seconds with one line, no worker's traceback, no process left, nothing in the cache."""
    big = Path(places["tmp"]) / "big.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPT2_CACHE": str(tmp_path / "c")}
    with bounded.Proc([sys.executable, "-m", "gpt2", "train", "--dataset", str(big),
                       *[a.format(**places) for a in hostile._train()]],
                      env=env, cwd=tmp_path) as proc:
        proc.wait_for(lambda line: line.startswith("Loading dataset"), timeout=60)
        time.sleep(delay)
        proc.signal(sig, group=True)
        done = proc.finish(timeout=20)
        left = [p for p in proc.tree()[1:] if bounded.alive(p)]
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()
             and not ln.startswith("encoding ") and "it/s]" not in ln]
    assert done.returncode == 128 + sig, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and lines == [
        "interrupted" if sig == signal.SIGINT else "terminated"], done.stderr[-3000:]
    assert left == [], "a worker outlived the run"
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()
                and p.name.startswith(".")], "a temporary file was left in the cache"

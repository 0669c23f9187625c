"""tests/bounded.py, itself: a stuck process or worker fails its test with its stack, is killed,
and leaves nothing running (what keeps the suite from ever hanging)."""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest

import bounded

SLEEPER = "import time\ndef stuck_here():\n    time.sleep(600)\nstuck_here()\n"


def test_a_stuck_process_fails_with_its_stack_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        with bounded.Proc([sys.executable, "-c", SLEEPER]) as proc:
            proc.finish(timeout=1)
    assert time.monotonic() - t0 < 60
    message = str(failed.value)
    assert "still running after 1 s" in message
    assert "stuck_here" in message  # faulthandler's (and py-spy's, where it attaches) stack
    assert not bounded.alive(proc.pid)


def test_waiting_for_a_line_that_never_comes_fails():
    with pytest.raises(pytest.fail.Exception, match="no line expected within 1 s"):
        with bounded.Proc([sys.executable, "-c", "print('hello', flush=True)\n" + SLEEPER]) as p:
            assert p.wait_for(lambda line: line.startswith("hello"), timeout=30)
            p.wait_for(lambda line: line.startswith("never"), timeout=1)


def test_a_grandchild_holding_the_output_open_is_found_and_killed():
    """The parent exits, its child keeps the pipes: the wait still ends, and both are gone."""
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}])\n")
    with pytest.raises(pytest.fail.Exception, match="still hold its output open"):
        bounded.run([sys.executable, "-c", code], timeout=2)
    time.sleep(0.5)
    assert not [p for p in bounded.descendants(bounded.os.getpid())
                if bounded.alive(p) and "stuck_here" in bounded._cmdline(p)]


def _sleeping_worker(rank: int) -> None:
    if rank == 1:
        time.sleep(600)


def test_a_stuck_spawned_worker_fails_with_its_stack_and_is_killed():
    with pytest.raises(pytest.fail.Exception) as failed:
        bounded.spawn(_sleeping_worker, nprocs=2, timeout=5)
    # rank 1 sleeps; rank 0 may still be starting (importing torch) on a loaded machine
    assert re.search(r"\b[12] worker\(s\) still running after 5 s", str(failed.value))
    assert not [p for p in bounded.descendants(bounded.os.getpid())
                if bounded.alive(p) and "multiprocessing" in bounded._cmdline(p)
                and "resource_tracker" not in bounded._cmdline(p)]


def test_a_stuck_thread_fails_with_its_stack():
    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    try:
        with pytest.raises(pytest.fail.Exception, match="1 thread\\(s\\) still running"):
            bounded.join([t], timeout=0.5)
    finally:
        release.set()

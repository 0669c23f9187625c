"""Waits that end: every test that starts a process, a server or a collective waits through here.

Each wait has a deadline. Past it, the stacks of everything still running in the test's process
tree are printed (py-spy's native and Python stacks where py-spy can attach, then Python's
faulthandler, which every process started here has on), the whole tree is killed, and the test
fails with those stacks. Nothing is joined forever, so the suite finishes without pytest-timeout
(which stays configured only as a last resort), and tests/test_layout.py keeps tests from
starting processes or joining threads any other way.

    proc = run([sys.executable, "train.py", ...], timeout=120, cwd=tmp)   # CompletedProcess
    with Proc(cmd, cwd=tmp) as p:                                         # streaming
        p.wait_for(lambda line: line.startswith("[3 |"), timeout=60)
        p.signal(signal.SIGINT)
        done = p.finish(timeout=60)
    spawn(worker, args=(port, out), nprocs=2, timeout=90)                 # torch.multiprocessing

On Linux the test session is made a child subreaper (conftest.py), so a process whose parent
died is still ours to find and kill, and :func:`kill_leftovers` ends whatever a test left.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

# Python prints every thread's stack on SIGABRT (and on a crash) in processes started here.
STACK_ENV = {"PYTHONFAULTHANDLER": "1"}
TAIL = 4000  # characters of a stuck process's output kept in the failure message


# --- the process tree -------------------------------------------------------------------------

def _stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = (int(fields[1]), int(fields[3]))
    return out


def descendants(pid: int, session: int | None = None) -> list[int]:
    """Every process below ``pid``, parents before children; with ``session``, also those of
    that session whose parent has died (re-parented elsewhere)."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    if session is not None:
        out += [p for p, (_, sid) in stats.items() if sid == session and p != pid and p not in out]
    return out


def alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def stacks(pids: list[int]) -> str:
    """py-spy's native + Python stacks of each process (bounded: 20 s each), when it can attach."""
    spy = _py_spy()
    if spy is None:
        return "(py-spy not installed: only faulthandler's Python stacks, in the output above)"
    parts = []
    for pid in pids:
        if not alive(pid):
            continue
        try:
            r = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True,
                               text=True, timeout=20)
            parts.append(f"--- pid {pid}: {_cmdline(pid)}\n{r.stdout}{r.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"--- pid {pid}: py-spy did not answer in 20 s")
    return "\n".join(parts)


def kill_tree(pids: list[int], dump: bool) -> None:
    """SIGABRT first when ``dump`` (faulthandler prints the Python stacks), then SIGKILL."""
    if dump:
        for pid in pids:
            _send(pid, signal.SIGABRT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
    for pid in pids:
        _send(pid, signal.SIGKILL)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def adopt_orphans() -> None:
    """Linux: become a child subreaper, so processes orphaned by a dead parent (a torchrun
    agent's workers, an encoder's pool) are re-parented to this session and stay findable."""
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_leftovers(spare: tuple[str, ...] = ("resource_tracker", "forkserver")) -> list[str]:
    """Kill every process still below this one (the end of the session) but multiprocessing's
    own helpers (``spare``), which exit with it; the command lines of those killed."""
    left = [pid for pid in descendants(os.getpid())
            if alive(pid) and not any(s in _cmdline(pid) for s in spare)]
    names = [f"{pid}: {_cmdline(pid)}" for pid in left]
    kill_tree(left, dump=False)
    for pid in left:  # reap what became our children (subreaper), so nothing stays a zombie
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return names


# --- processes --------------------------------------------------------------------------------

class Proc:
    """A process whose output is read as it comes, with a deadline on every wait.

    ``merge=True`` sends stderr into stdout. Leaving the ``with`` block kills whatever of the
    tree is still running (a test that failed half-way leaves nothing behind).
    """

    def __init__(self, cmd: list[str], *, cwd=None, env: dict | None = None,
                 input: str | None = None, merge: bool = False):
        self.cmd = [str(c) for c in cmd]
        self.popen = subprocess.Popen(
            self.cmd, cwd=cwd, env={**(os.environ if env is None else env), **STACK_ENV},
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True, start_new_session=True)
        self.pid = self.popen.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [self._reader(self.popen.stdout, self.out, self.lines)]
        if not merge:
            self._readers.append(self._reader(self.popen.stderr, self.err, None))
        if input is not None:
            threading.Thread(target=self._write, args=(input,), daemon=True).start()

    def _reader(self, stream, into: list[str], lines) -> threading.Thread:
        def read() -> None:
            for line in stream:
                into.append(line)
                if lines is not None:
                    lines.put(line)
            if lines is not None:
                lines.put(None)  # end of output

        t = threading.Thread(target=read, daemon=True)
        t.start()
        return t

    def _write(self, text: str) -> None:
        try:
            self.popen.stdin.write(text)
            self.popen.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def tree(self) -> list[int]:
        """The process and everything it started (its own session: also what outlived it)."""
        return [self.pid, *descendants(self.pid, session=self.pid)]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first new line of stdout for which ``predicate`` holds; the test fails if none
        comes within ``timeout`` seconds or the output ends first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stuck(f"no line expected within {timeout:g} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=10)
                pytest.fail(f"{self.name} ended (exit {self.popen.returncode}) before the "
                            f"expected line:\n{self.tails()}")
            if predicate(line):
                return line

    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the process (``group``: its whole process group, as a terminal's
        Ctrl-C does)."""
        if group:
            os.killpg(self.pid, sig)
        else:
            self.popen.send_signal(sig)

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the exit and the end of the output; stuck past ``timeout``: stacks, kill,
        fail."""
        deadline = time.monotonic() + timeout
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stuck(f"still running after {timeout:g} s")
        for t in self._readers:
            # A child of ours may still hold the pipes open: it is stuck, or leaked.
            t.join(timeout=max(1.0, deadline - time.monotonic()))
            if t.is_alive():
                self.stuck(f"exited {self.popen.returncode}, but processes it started still "
                           "hold its output open")
        return subprocess.CompletedProcess(self.cmd, self.popen.returncode, self.stdout,
                                           self.stderr)

    @property
    def name(self) -> str:
        return " ".join(Path(c).name if os.sep in c else c for c in self.cmd[:4])

    def tails(self) -> str:
        return (f"--- stdout (tail)\n{self.stdout[-TAIL:]}\n"
                f"--- stderr (tail)\n{self.stderr[-TAIL:]}")

    def stuck(self, why: str):
        pids = [p for p in self.tree() if alive(p)]
        native = stacks(pids)
        kill_tree(pids, dump=True)
        for t in self._readers:
            t.join(timeout=5)
        self.popen.poll()
        pytest.fail(f"{self.name}: {why}; killed {len(pids)} process(es). Stacks:\n{native}\n"
                    f"{self.tails()}", pytrace=False)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc) -> None:
        live = [p for p in self.tree() if alive(p)]
        if live:
            kill_tree(live, dump=False)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run(cmd: list, *, timeout: float, cwd=None, env: dict | None = None,
        input: str | None = None, merge: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose wait ends (:class:`Proc`)."""
    with Proc(cmd, cwd=cwd, env=env, input=input, merge=merge) as p:
        return p.finish(timeout)


def join(threads: list[threading.Thread], timeout: float) -> None:
    """Join ``threads`` within ``timeout`` seconds in all; the test fails (with their stacks)
    if any is still running then (their daemon flag lets the session exit regardless)."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        frames = sys._current_frames()
        import traceback

        text = "\n".join(f"--- thread {t.name}\n" + "".join(traceback.format_stack(
            frames[t.ident])) for t in stuck if t.ident in frames)
        pytest.fail(f"{len(stuck)} thread(s) still running after {timeout:g} s:\n{text}",
                    pytrace=False)


# --- torch.multiprocessing --------------------------------------------------------------------

def _traced(rank: int, fn: Callable, *args) -> None:
    faulthandler.enable()  # a SIGABRT from stuck() prints this worker's Python stacks
    fn(rank, *args)


def spawn(fn: Callable, args: tuple = (), nprocs: int = 2, timeout: float = 120) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn")`` with a
    deadline: a worker that raises fails the test as there; one that does not finish within
    ``timeout`` seconds has its stacks printed and every worker is killed."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_traced, args=(fn, *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                pids = [p.pid for p in context.processes]
                pids = [p for p in pids + [d for p in pids for d in descendants(p)] if alive(p)]
                native = stacks(pids)
                kill_tree(pids, dump=True)
                pytest.fail(f"{getattr(fn, '__name__', fn)}: {len(pids)} worker(s) still running "
                            f"after {timeout:g} s, killed. Stacks (faulthandler's are on stderr "
                            f"above):\n{native}", pytrace=False)
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

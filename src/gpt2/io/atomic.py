"""Atomic file writes: the one way every file of the project is written.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))   # any writer that takes a path
    write_text(path, "text")                                      # or text
    with atomic_path(path) as tmp:                                # or a stream of any length
        with open(tmp, "wb") as f: ...

The data goes to a hidden temporary file beside the target (``.<name>.tmp-<pid>-<random>``, so a
crashed writer's leftovers are recognisable by name), is flushed to disk, given the mode a plain
``open()`` would give under the current umask (0644 under umask 022: ``mkstemp`` alone makes
0600, and a model directory is meant to be shared), and renamed onto the target. A reader sees
the old file or the new one, never half of either; a failed write removes its temporary file.
A full disk becomes a one-line :class:`~gpt2.errors.UserError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError

TMP_MARK = ".tmp-"
# Our temporary names: ".<target>.tmp-<pid>-<8 hex>" for files and ".tmp-<what>-<pid>" dirs.
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: 0644 under umask 022."""
    return 0o666 & ~umask()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file name :func:`temp_name` makes (never a user's)."""
    return _TMP_FILE.match(name) is not None


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_space_message(path: Path, needed: int | None = None) -> str:
    """``<path>: no space left on device (needs about N MB, M MB free)``."""
    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
        room = f", {free / 1e6:.0f} MB free"
    except OSError:
        room = ""
    need = f"needs about {needed / 1e6:.0f} MB" if needed else "needs more"
    return f"{path}: no space left on device ({need}{room})"


def is_no_space(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, also when a library wrapped it into its own error type."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def publish(tmp: Path, path: Path, durable: bool = True) -> None:
    """Give the finished temporary file ``tmp`` its mode and rename it onto ``path``."""
    os.chmod(tmp, file_mode())  # after writing: some writers replace the file they get
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary path to write; renamed onto ``path`` when the block ends without error.

    ``durable``: fsync the file before the rename and the directory after it, so the new
    content survives a power loss once this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        publish(tmp, path, durable)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_no_space(e):
            raise UserError(no_space_message(path)) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object],
                 durable: bool = True) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``. Returns ``path``."""
    with atomic_path(path, durable) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8",
               errors: str = "strict", durable: bool = True) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding, errors=errors) as f:
            f.write(text)

    return atomic_write(path, write, durable)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2,
               durable: bool = True) -> Path:
    """``obj`` as JSON text (indented, with a final newline when ``indent`` is set)."""
    text = json.dumps(obj, indent=indent) + ("\n" if indent is not None else "")
    return write_text(path, text, durable=durable)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, durable: bool = True) -> Path:
    """Copy ``src``'s bytes to ``dst`` atomically (the copy gets ``dst``'s umask mode)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), durable)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files that writers of dead processes left in ``folder``."""
    removed = []
    for p in Path(folder).iterdir() if Path(folder).is_dir() else []:
        m = _TMP_FILE.match(p.name)
        if m and p.is_file() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(build: Callable[[Path], object], out: str | os.PathLike,
                force: bool = False) -> Path:
    """Run ``build(tmp_dir)`` and move the finished directory to ``out`` in one rename.

    An existing non-empty ``out`` is replaced only with ``force``; until the final rename it is
    left untouched, so an interrupted build never leaves a half-written directory behind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another directory or pass --force to "
                        "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_name(out), temp_name(out)
    try:
        tmp.mkdir()
        build(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous directory back
        if is_no_space(e):
            raise UserError(no_space_message(out)) from None
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return out

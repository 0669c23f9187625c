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
A full disk, a read-only file system, a missing permission or a file where a directory should
be becomes a one-line :class:`WriteError` naming the file the caller asked for.
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
    return f"{path}: {_no_space(path, needed)}"


def _no_space(path: Path, needed: int | None = None) -> str:
    try:
        free = shutil.disk_usage(path if path.is_dir() else existing_parent(path)).free
        room = f", {free / 1e6:.0f} MB free"
    except OSError:
        room = ""
    need = f"needs about {needed / 1e6:.0f} MB" if needed else "needs more"
    return f"no space left on device ({need}{room})"


def existing_parent(path: Path) -> Path:
    """``path``, or the nearest directory above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_no_space(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, also when a library wrapped it into its own error type (numpy's
    ``tofile``, which gguf-py writes with, says only ``N requested and M written``)."""
    if isinstance(e, WriteError):
        return e.no_space
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or \
        re.search(r"\d+ requested and \d+ written", text) is not None


class WriteError(UserError):
    """A file or directory could not be written: ``<path>: <why>`` in one line (no space, a
    read-only file system, no permission, a file where a directory should be)."""

    def __init__(self, path: str | os.PathLike, reason: str, no_space: bool = False,
                 needed: int | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.no_space, self.needed = Path(path), reason, no_space, needed


def write_error(e: BaseException, path: str | os.PathLike,
                needed: int | None = None) -> WriteError | None:
    """``e`` as a :class:`WriteError` naming ``path`` (the file or directory the user asked
    for, not a temporary name inside it), or None if it is not an error of writing."""
    path = Path(path)
    if isinstance(e, WriteError):
        needed = needed or e.needed
        return WriteError(path, _no_space(path, needed) if e.no_space else e.reason, e.no_space,
                          needed)
    if isinstance(e, OSError) and not _concerns(e, path):
        return None  # (another file's trouble, reading a source say: its own message)
    if is_no_space(e):
        return WriteError(path, _no_space(path, needed), True, needed)
    if not isinstance(e, OSError):
        return None
    reasons = {errno.EROFS: "cannot write there: the file system is read-only",
               errno.EACCES: "cannot write there: permission denied",
               errno.EPERM: "cannot write there: operation not permitted",
               errno.ENOTDIR: "cannot write there: a part of the path is a file, not a "
                              "directory",
               errno.EEXIST: "cannot write there: a part of the path is a file, not a "
                             "directory",
               errno.ENAMETOOLONG: "cannot write there: the name is too long"}
    if e.errno in reasons:
        return WriteError(path, reasons[e.errno])
    return None


def _concerns(e: OSError, path: Path) -> bool:
    """Whether ``e`` is about writing ``path``: it names no file (a write to an open file), or
    ``path``, a directory above it (made on the way), or something in or under ``path`` or
    one of its temporary names beside it."""
    names = [n for n in (e.filename, e.filename2) if n is not None]
    if not names:
        return True
    target = Path(os.path.abspath(path))
    for name in names:
        p = Path(os.path.abspath(os.fsdecode(name)))
        if p in target.parents:
            return True
        for q in (p, *p.parents):
            if q == target or (q.parent == target.parent
                               and q.name.startswith(f".{target.name}{TMP_MARK}")):
                return True
    return False


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
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        publish(tmp, path, durable)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        error = write_error(e, path)
        if error is not None:
            raise error from None
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
    tmp, old = temp_name(out), temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
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
        error = write_error(e, out)
        if error is not None:
            raise error from None
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return out

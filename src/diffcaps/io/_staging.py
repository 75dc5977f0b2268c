"""Atomic writes: a file or a whole folder is built beside its target and swapped in when complete.

A file is written as ``.<name>.<token>.diffcaps-partial`` in the target's folder and renamed
onto the target. A folder is built as a sibling ``.<name>.<token>.diffcaps-partial/``; when it
is complete, the entries of the old folder that the new one does not replace are carried over
(hard links, copies where links are refused), and the two folders are exchanged in one atomic
rename (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS) before
the old one is removed. A reader, or a concurrent save, sees the old folder or the new one,
never a mix. Where the system has no atomic exchange, the swap is two renames; the old folder
waits as ``.<name>.<token>.diffcaps-old`` between them.

Each build holds an advisory lock (``flock``) on its temporary file or folder, and the kernel
drops it when the process dies. Before building, a write removes every leftover beside its
target whose lock it can take (a killed save's), and puts back an old folder a killed
two-rename swap left out.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from diffcaps.errors import CheckpointError
from diffcaps.io._safetensors import publish

__all__ = ["staged_file", "staged_folder"]

PARTIAL: Final = ".diffcaps-partial"
OLD: Final = ".diffcaps-old"


def _try_lock(path: Path) -> int | None:
    """Open ``path`` and take its exclusive lock without waiting: the descriptor, or None if held."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if sys.platform != "win32":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _leftovers(target: Path, suffix: str) -> list[Path]:
    head = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in sorted(names) if n.startswith(head) and n.endswith(suffix)]


def clean_leftovers(target: Path) -> None:
    """Remove what killed writes to ``target`` left beside it; put back an old folder a killed swap left out."""
    for suffix in (OLD, PARTIAL):
        for leftover in _leftovers(target, suffix):
            fd = _try_lock(leftover)
            if fd is None:  # a live write holds it
                continue
            try:
                if suffix == OLD and not os.path.lexists(target):
                    os.rename(leftover, target)
                else:
                    _remove(leftover)
            except OSError:
                pass  # another cleaner got there first
            finally:
                os.close(fd)


def _claim(target: Path, suffix: str, *, folder: bool) -> tuple[Path, int]:
    """Create a fresh locked file or folder beside ``target``: its path and the descriptor holding the lock."""
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")
        if folder:
            path.mkdir()
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        fd = _try_lock(path)
        if fd is None:
            continue
        try:  # a cleaner may have taken it between creation and lock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def staged_file(path: Path) -> Generator[Path, None, None]:
    """Yield a temporary file beside ``path``; on success it replaces ``path``, on failure it is removed."""
    clean_leftovers(path)
    temporary, fd = _claim(path, PARTIAL, folder=False)
    try:
        yield temporary
        publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        os.close(fd)


def _exchange_function() -> Callable[[Path, Path], bool] | None:
    """The system's atomic exchange of two paths, if it has one: returns False where a filesystem refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    unsupported = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
    if sys.platform == "linux" and hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        at_fdcwd, rename_exchange = -100, 2

        def exchange(a: Path, b: Path) -> bool:
            if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
                return True
            code = ctypes.get_errno()
            if code in unsupported:
                return False
            raise OSError(code, os.strerror(code), str(a), None, str(b))

        return exchange
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        renamex_np = libc.renamex_np
        rename_swap = 2

        def swap(a: Path, b: Path) -> bool:
            if renamex_np(os.fsencode(a), os.fsencode(b), rename_swap) == 0:
                return True
            code = ctypes.get_errno()
            if code in unsupported:
                return False
            raise OSError(code, os.strerror(code), str(a), None, str(b))

        return swap
    return None


_EXCHANGE: Final = _exchange_function()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or filesystem cannot."""
    return _EXCHANGE is not None and _EXCHANGE(a, b)


def _two_renames(stage: Path, target: Path) -> None:
    """Swap without an atomic exchange: the old folder waits, locked, beside the target in between."""
    fd = _try_lock(target)
    old = target.with_name(f".{target.name}.{secrets.token_hex(6)}{OLD}")
    try:
        os.rename(target, old)
        os.rename(stage, target)
    finally:
        if fd is not None:
            os.close(fd)
    _remove(old)


def _swap(stage: Path, target: Path) -> None:
    """Put the finished ``stage`` at ``target``; afterwards ``stage`` holds the old folder, if any."""
    while True:
        try:
            if not os.path.lexists(target):
                os.rename(stage, target)
            elif not exchange(stage, target):
                _two_renames(stage, target)
            return
        except FileNotFoundError:
            if not os.path.lexists(stage):
                raise
        except OSError as exc:  # another save created the target just now: swap with that one
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        destination = new / entry.name
        if replaced(entry.name) or os.path.lexists(destination) or entry.name.endswith((PARTIAL, OLD)):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(destination))


@contextmanager
def staged_folder(target: Path, replaced: Callable[[str], bool]) -> Generator[Path, None, None]:
    """Yield an empty folder beside ``target``; on success it becomes ``target``, on failure it is removed.

    Entries of the old ``target`` for which ``replaced(name)`` is false, and that the new folder
    does not hold, are carried into the new folder before the swap (hard links where the
    filesystem allows, copies otherwise). A symlinked ``target`` is followed: the folder it
    points to is replaced.
    """
    if target.is_symlink():
        target = target.resolve()
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError("is not a folder; a model folder cannot be written here", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    stage, fd = _claim(target, PARTIAL, folder=True)
    try:
        yield stage
        if target.is_dir():
            _carry_over(target, stage, replaced)
        _swap(stage, target)
    finally:
        _remove(stage)
        os.close(fd)

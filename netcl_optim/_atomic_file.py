"""Atomic file replacement: write a temporary file next to the target, then rename it over.

The temporary file is ``.<name>.<16 hex digits>.tmp`` in the target's directory, locked
(``flock``) while the write runs, so that a concurrent writer of the same target never
takes it for stale; such files left by a killed writer are removed by the next write of the
same target. Where ``flock`` is missing (Windows) stale files are left in place.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporary files are then left in place
    fcntl = None  # type: ignore[assignment]


def _lock(fd: int, wait: bool) -> bool:
    """Lock ``fd`` exclusively (``flock``); False where another holds it (without ``wait``)
    or where locks are not available (Windows, a file system without them)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _is_named(fd: int, name: str) -> bool:
    """Whether ``name`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(name))
    except FileNotFoundError:
        return False


def _discard(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def _create_temp(directory: str, base: str) -> tuple[int, str]:
    """A new temporary file for the target ``base``: open for writing, locked, so that no
    concurrent write removes it as stale, and created with mode 0o666 (the umask applies)."""
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            # another write may have swept it as stale before we held the lock: if so, retry
            if not _lock(fd, wait=True) or _is_named(fd, tmp):
                return fd, tmp
        except BaseException:
            os.close(fd)
            _discard(tmp)
            raise
        os.close(fd)


def _remove_stale_temps(directory: str, base: str) -> None:
    """Remove the temporary files of the target ``base`` that no write holds (locks): those
    of a killed write. A file that cannot be locked or opened is left alone."""
    if fcntl is None:
        return
    pattern = re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{16}}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not pattern.fullmatch(name):
            continue
        tmp = os.path.join(directory, name)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # no FIFO, no link
        except OSError:
            continue
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular and _lock(fd, wait=False) and _is_named(fd, tmp):
                os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Replace the file ``path`` by what ``write`` writes to the file object it is given.

    ``write`` fills a temporary file in the same directory, which is flushed, fsynced and
    renamed over ``path``: a crash leaves the old file or the new one, never a torn file.
    A new file gets the mode the umask gives (0o644 under umask 0o022), an overwritten one
    keeps its mode. Temporary files of ``path`` left by a killed write are removed; those of
    writes still running (in any process) are not. If ``write`` raises, the temporary file
    is removed and ``path`` is unchanged.
    """
    directory, base = os.path.split(os.path.abspath(path))
    try:
        old = os.stat(path)
        mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
    except OSError:
        mode = None
    fd, tmp = _create_temp(directory, base)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while locked: no other write takes it for stale
                os.replace(tmp, path)
        if fcntl is None:  # Windows renames no open file
            os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _remove_stale_temps(directory, base)
    try:  # make the rename durable too (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)

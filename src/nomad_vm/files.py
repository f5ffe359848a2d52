"""Files shared between threads and plugin processes: atomic replacement, exclusive locks, and
the tail of a helper's log for an error message."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomically(dest: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``dest`` with ``data``: a temporary file in the same directory (so the rename is
    atomic; created 0600 whatever the umask, then given ``mode``), fsync, rename, and fsync of
    the directory so the rename itself survives a host crash. ``durable=False`` skips both
    fsyncs: readers (another process, a restarted plugin) still see the old or the new content,
    never a mix, but a host crash may lose the change. OSError on failure, with no temporary
    file left behind."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if mode != 0o600:
                os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if not durable:
        return
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block.

    The lock file may be unlinked by a holder that is discarding what it protects: a waiter
    that then gets the lock on the old inode excludes nobody who opens the path anew, so it
    starts over until the lock it holds is on the file the path names. OSError if the file
    cannot be opened."""
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_log_tail(path: Path, limit: int = 2000, start: int = 0) -> str:
    """The last lines of a log (QEMU's, a virtiofsd's), as one line of text for an event or an
    error message; only what was written from byte ``start`` on (a log shared with others)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())

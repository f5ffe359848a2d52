"""Writing a file so that readers see the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``dest`` with ``data``: a temporary file in the same directory (so the rename is
    atomic; created 0600 whatever the umask, then given ``mode``), fsync, rename, and fsync of
    the directory so the rename itself survives a host crash. OSError on failure, with no
    temporary file left behind."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if mode != 0o600:
                os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

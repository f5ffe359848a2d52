"""Opening Nomad's task log FIFOs for the VMM's console output."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os

from nomad_vm.errors import HypervisorError

# Nomad's logmon opens the FIFO for reading before StartTask; allow it a moment if it is late.
FIFO_OPEN_TIMEOUT = 10.0


async def open_task_output(path: str) -> int:
    """A blocking write fd for ``path`` (a FIFO, a file, or /dev/null when logs are disabled).

    The FIFO is opened non-blocking first, because a blocking open with no reader would hang the
    StartTask RPC forever; the fd handed to the VMM is then switched back to blocking.
    """
    if not path:
        path = os.devnull
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIFO_OPEN_TIMEOUT
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or loop.time() > deadline:
                raise HypervisorError(f"cannot open task output {path}: {exc.strerror}") from exc
            await asyncio.sleep(0.05)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd

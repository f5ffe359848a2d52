"""Running the real `nomad` CLI on a terminal of its own, as when a user types the command."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class TerminalRun:
    output: bytes
    returncode: int


def run_on_terminal(argv: list[str], env: dict[str, str], rows: int, cols: int) -> TerminalRun:
    """Run ``argv`` with a pty as its stdin/stdout/stderr, as when a user types the command."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process and everything holding the terminal are gone
                break
            if not chunk:
                break
            output += chunk
    os.close(master)
    return TerminalRun(output, process.wait(timeout=30))

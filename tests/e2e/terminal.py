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


class InteractiveTerminal:
    """A program on a pty of its own that the test types into, reading what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 30, cols: int = 100):
        self._master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.output = b""
        self._closed = False

    def _read(self, timeout: float) -> None:
        if self._closed:
            return
        if select.select([self._master], [], [], timeout)[0]:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the program and everything holding the terminal are gone
                chunk = b""
            if chunk:
                self.output += chunk
            else:
                self._closed = True

    def expect(self, needle: bytes, timeout: float, after: int = 0) -> int:
        """Wait until ``needle`` shows (at or after offset ``after``); the offset after it.
        AssertionError, with what was shown, when it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(needle, after)) < 0:
            left = deadline - time.monotonic()
            assert left > 0 and not self._closed, (needle, self.output[-3000:])
            self._read(min(left, 1.0))
        return found + len(needle)

    def send(self, data: bytes) -> None:
        os.write(self._master, data)

    def wait(self, timeout: float) -> int:
        """Read until the program has exited and closed the terminal; its exit code."""
        deadline = time.monotonic() + timeout
        while not self._closed and time.monotonic() < deadline:
            self._read(0.5)
            if self.process.poll() is not None:
                self._read(0.2)
                break
        return self.process.wait(timeout=max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if not self._closed:
            self._closed = True
        os.close(self._master)

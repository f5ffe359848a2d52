"""QEMU's serial console (its stdout) read as it comes, for tests that boot guests by hand.

Chunks rather than lines: a login prompt has no newline. ``wait_for`` reports when the text
first appeared, in seconds since QEMU started, and fails the test with the console's tail.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest


class QemuConsole:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.started = time.monotonic()
        self._process = process
        self._text = ""
        # (arrival time, length of the text after that chunk) for locating a match in time
        self._ends: list[int] = []
        self._times: list[float] = []
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._changed:
                self._text += chunk.decode(errors="replace").replace("\r", "")
                self._ends.append(len(self._text))
                self._times.append(time.monotonic() - self.started)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _found_at(self, text: str) -> float | None:
        index = self._text.find(text)
        if index < 0:
            return None
        return self._times[bisect.bisect_left(self._ends, index + len(text))]

    def wait_for(self, text: str, timeout: float = 180.0) -> float:
        """Seconds since QEMU started at which ``text`` appeared on the console."""
        deadline = time.monotonic() + timeout
        with self._changed:
            # Give up only once the output has ended (EOF), not merely when QEMU exited: the
            # reader may still be behind.
            while not self._closed and time.monotonic() < deadline:
                found = self._found_at(text)
                if found is not None:
                    return found
                self._changed.wait(min(max(deadline - time.monotonic(), 0.01), 0.5))
            found = self._found_at(text)
        if found is not None:
            return found
        pytest.fail(
            f"no {text!r} on the console after {timeout} s (QEMU exit status "
            f"{self._process.poll()}):\n{self.tail()}"
        )

    def text(self) -> str:
        with self._changed:
            return self._text

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


@contextlib.contextmanager
def run_qemu(
    argv: list[str], pass_fds: tuple[int, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], QemuConsole]]:
    """QEMU started with its console (and its own errors, interleaved) read as it comes; killed
    afterwards if it is still running. ``pass_fds``: descriptors the command line names."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=pass_fds,
    )
    try:
        yield process, QemuConsole(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()

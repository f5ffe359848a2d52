"""Drive an interactive ExecTaskStreaming session the way `nomad alloc exec` does: requests are
sent as the test types, responses are collected as they arrive (a thread each way)."""

from __future__ import annotations

import queue
import threading
import time

import grpc

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import drv

Request = driver_pb2.ExecTaskStreamingRequest


class StreamingSession:
    def __init__(
        self, plugin: PluginProcess, task_id: str, command: list[str], *, tty: bool = True
    ) -> None:
        self._requests: queue.Queue[Request | None] = queue.Queue()
        setup = Request(setup=Request.Setup(task_id=task_id, command=command, tty=tty))
        if tty:
            setup.tty_size.height, setup.tty_size.width = 30, 100
        self._requests.put(setup)
        self.output = bytearray()
        self.exit_code: int | None = None
        self.error: grpc.RpcError | None = None
        self._lock = threading.Lock()
        self._stream = drv(plugin).ExecTaskStreaming(iter(self._requests.get, None), timeout=300)
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            for frame in self._stream:
                with self._lock:
                    self.output += frame.stdout.data + frame.stderr.data
                    if frame.exited:
                        self.exit_code = frame.result.exit_code
        except grpc.RpcError as exc:
            self.error = exc

    def type(self, data: bytes) -> None:
        self._requests.put(Request(stdin=driver_pb2.ExecTaskStreamingIOOperation(data=data)))

    def close_input(self) -> None:
        self._requests.put(Request(stdin=driver_pb2.ExecTaskStreamingIOOperation(close=True)))

    def hang_up(self) -> None:
        """The client goes away: the request stream ends without a close message."""
        self._requests.put(None)

    def cancel(self) -> None:
        self._stream.cancel()

    def text(self) -> str:
        with self._lock:
            return self.output.decode(errors="replace")

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        """True once ``needle`` has arrived (polling what the receiving thread collected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if needle in self.output:
                    return True
            time.sleep(0.05)
        return False

    def wait_exit(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        self._requests.put(None)  # ends the request iterator if the session ended first
        return self.exit_code

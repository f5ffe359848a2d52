"""The fake CH's vsock device: a hybrid-vsock unix socket (CH's docs/vsock.md: ``CONNECT
<port>\\n`` answered with ``OK <host port>\\n``, or the connection closed when nothing in the
guest listens on that port), and behind it, on the agent's port, a simulated guest's
qemu-guest-agent that knows just enough of the protocol for exec: ``guest-sync-delimited``,
``guest-ping``, ``guest-exec`` (which runs nothing: the "guest" prints its argv) and
``guest-exec-status``. Bound by the fake VMM, under its user, at the name the VM definition
gives (relative: in its working directory). Standard library only (the fake runs with the
system's Python as vm_user). A test of our wiring, not of CH or of qemu-ga.
"""

from __future__ import annotations

import base64
import json
import os
import socketserver
import threading
from typing import Any

SENTINEL = b"\xff"


class _Handler(socketserver.StreamRequestHandler):
    server: HybridVsock

    def handle(self) -> None:
        line = self.rfile.readline(64)
        words = line.split()
        port = int(words[1]) if len(words) == 2 and words[1].isdigit() else None
        if words[:1] != [b"CONNECT"] or port is None or port != self.server.agent_port:
            return  # refused: nothing listens there
        self.wfile.write(b"OK 1073741824\n")
        self.wfile.flush()
        buffer = b""
        while chunk := self.request.recv(65536):
            buffer += chunk
            *commands, buffer = buffer.split(b"\n")
            for raw in commands:
                reply = self.server.answer(raw.lstrip(SENTINEL))
                if reply:
                    self.wfile.write(reply)
                    self.wfile.flush()


class HybridVsock(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, agent_port: int | None) -> None:
        # The port the simulated guest's agent listens on; None: nothing listens yet.
        self.agent_port = agent_port
        self.execs: dict[int, list[str]] = {}
        # Where the simulated guest also says what its agent ran (the fake executable: its
        # serial console), so a test of a process of its own can see it; None: nowhere.
        self.console_fd: int | None = None
        self._next_pid = 1000
        self._lock = threading.Lock()
        super().__init__(path, _Handler)

    def answer(self, raw: bytes) -> bytes:
        try:
            message = json.loads(raw)
        except ValueError:
            return b""
        command: str = message.get("execute", "")
        arguments: dict[str, Any] = message.get("arguments") or {}
        if command == "guest-sync-delimited":
            return SENTINEL + _line({"return": arguments.get("id")})
        if command == "guest-ping":
            return _line({"return": {}})
        if command == "guest-exec":
            with self._lock:
                self._next_pid += 1
                pid = self._next_pid
                self.execs[pid] = [arguments.get("path", ""), *arguments.get("arg", [])]
            if self.console_fd is not None:
                os.write(
                    self.console_fd, f"fake guest agent: {' '.join(self.execs[pid])}\n".encode()
                )
            return _line({"return": {"pid": pid}})
        if command == "guest-exec-status":
            argv = self.execs.get(int(arguments.get("pid", 0)))
            if argv is None:
                error = {"class": "GenericError", "desc": "Invalid parameter 'pid'"}
                return _line({"error": error})
            said = f"fake guest ran: {' '.join(argv)}\n".encode()
            status = {"exited": True, "exitcode": 0, "out-data": base64.b64encode(said).decode()}
            return _line({"return": status})
        return _line({"error": {"class": "CommandNotFound", "desc": f"no {command}"}})


def _line(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode() + b"\n"


def serve_vsock(path: str, agent_port: int | None = None) -> HybridVsock:
    """Bound at ``path`` (as CH binds its vsock socket at vm.boot), served in a thread."""
    if os.path.exists(path):
        os.unlink(path)
    server = HybridVsock(path, agent_port)
    threading.Thread(target=server.serve_forever, name="fake vsock", daemon=True).start()
    return server

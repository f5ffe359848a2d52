"""A blocking client of the plugin's control socket (what `nomad-vm vm ...` uses)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from nomad_vm.control.protocol import encode

TIMEOUT = 60.0
MAX_REPLY = 16 * 1024 * 1024


class ControlError(Exception):
    """The plugin could not be asked, or it refused: the text says which and why."""


def call(path: Path, op: str, task: str = "", timeout: float = TIMEOUT) -> object:
    """One request, its result; ControlError with the plugin's reason, or why nobody answered."""
    request: dict[str, str] = {"op": op}
    if task:
        request["task"] = task
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied (the control socket is root's: run as root)"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"{path}: no plugin answers (is the plugin running, with this data_dir? "
                "see --data-dir and --as)"
            ) from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        conn.sendall(encode(request))
        reply = _read_line(conn, path)
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"{path}: the plugin's reply is not one: {reply!r}")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error") or "the plugin refused without a reason"))
    return reply.get("result")


def _read_line(conn: socket.socket, path: Path) -> object:
    data = bytearray()
    while b"\n" not in data:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise ControlError(f"{path}: the plugin did not answer in time") from None
        if not chunk:
            raise ControlError(f"{path}: the plugin closed the connection without a reply")
        data += chunk
        if len(data) > MAX_REPLY:
            raise ControlError(f"{path}: the plugin's reply is too long")
    try:
        return json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError as exc:
        raise ControlError(f"{path}: the plugin's reply is not JSON: {exc}") from None

"""The control socket's protocol: JSON lines over a root-only unix socket in the data_dir.

Why a socket of the plugin's own: a VM's QMP socket serves one client at a time and the plugin
holds that connection, so an operator's tool can only reach a VM through the plugin. Each
request is one JSON object on one line, ``{"op": ..., "task": ...}``; each reply one line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

Who may connect: the socket is 0600 in a 0700 directory, both owned by the plugin's user
(root), and the server also checks the peer's uid (SO_PEERCRED): a task (inside its VM, or any
process of another user on the host) cannot reach it. Each installed name (vm, virt, ch) has
its own data_dir, and so its own socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "control.sock"
# A request is a few dozen bytes; anything much longer is not one of ours.
MAX_REQUEST = 4096
# What the socket offers: read-only views, then the actions.
OPS = ("list", "info", "pause", "resume", "snapshot")
TASK_OPS = ("info", "pause", "resume", "snapshot")


class ProtocolError(Exception):
    """A request that is not one: the reason names the field at fault."""


def control_dir(data_dir: Path, alias: str) -> Path:
    """``<data_dir>/control`` (``control-<alias>`` for a seed driver's name, so that two names
    sharing a data_dir by configuration still get a socket each)."""
    return data_dir / ("control" if alias == "vm" else f"control-{alias}")


def socket_path(data_dir: Path, alias: str) -> Path:
    return control_dir(data_dir, alias) / SOCKET_NAME


@dataclass(frozen=True)
class Request:
    op: str
    # A task id, an allocation id, or a unique prefix of either (as `nomad` takes them).
    task: str = ""


def encode(message: object) -> bytes:
    return json.dumps(message, sort_keys=True).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"a request is one JSON object per line: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a request is a JSON object")
    op = raw.get("op")
    if op not in OPS:
        raise ProtocolError(f"op: must be one of {', '.join(OPS)} (got {op!r})")
    task = raw.get("task", "")
    if not isinstance(task, str):
        raise ProtocolError("task: must be a string (a task or allocation id, or a prefix)")
    if op in TASK_OPS and not task.strip():
        raise ProtocolError(f"task: {op} needs a task (a task or allocation id, or a prefix)")
    unknown = sorted(set(raw) - {"op", "task"})
    if unknown:
        raise ProtocolError(f"{unknown[0]}: not a field of a request (op, task)")
    return Request(op, task.strip())

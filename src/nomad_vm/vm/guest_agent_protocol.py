"""qemu-guest-agent messages: the error types, the JSON encoding of commands and the checked
decoding of replies. Pure functions; the connection and its synchronisation are in agent.py."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nomad_vm.errors import HypervisorError


class AgentError(HypervisorError):
    """Talking to the guest agent failed."""


class AgentUnavailable(AgentError):
    """No agent answered: the socket is gone, QEMU closed it, or nothing replied in time."""


class AgentProtocolError(AgentError):
    """The agent sent something that is not a reply of its protocol."""


class AgentCommandError(AgentError):
    """The agent answered with an error (``error_class`` is QMP's, e.g. CommandNotFound)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class AgentTimeout(AgentError):
    """A guest command ran past its timeout; ``killed`` tells whether it was killed."""

    def __init__(self, message: str, *, pid: int, killed: bool) -> None:
        super().__init__(message)
        self.pid = pid
        self.killed = killed


@dataclass(frozen=True)
class ExecResult:
    """A finished guest command. ``exit_code`` is 128 + signal when a signal ended it;
    ``truncated`` means qemu-ga dropped output past its 16 MiB per-stream capture limit."""

    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool


def encode_command(command: str, arguments: Mapping[str, object] | None) -> bytes:
    message: dict[str, object] = {"execute": command}
    if arguments:
        message["arguments"] = dict(arguments)
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def unwrap_reply(command: str, reply: dict[str, Any]) -> Any:
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], dict) else {}
        raise AgentCommandError(
            command, str(error.get("class", "?")), str(error.get("desc", reply["error"]))
        )
    return reply["return"]


def reply_dict(value: Any, command: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AgentProtocolError(f"{command} returned {value!r}, not an object")
    return value


def reply_int(reply: Any, key: str | None = None) -> int:
    """An integer reply (a file handle), or the integer ``key`` of an object reply."""
    value = reply.get(key) if key is not None and isinstance(reply, dict) else reply
    if not isinstance(value, int) or isinstance(value, bool):
        raise AgentProtocolError(f"guest agent returned {reply!r}, expected an integer {key}")
    return value


def reply_b64(value: Any, command: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentProtocolError(f"{command} returned invalid base64: {exc}") from None


def exec_result(status: dict[str, Any]) -> ExecResult:
    signal, exit_code = status.get("signal"), status.get("exitcode")
    signal = signal if isinstance(signal, int) else None
    if not isinstance(exit_code, int):  # killed: the shell's convention, as Nomad's executor
        exit_code = 128 + signal if signal is not None else -1
    return ExecResult(
        exit_code=exit_code,
        signal=signal,
        stdout=reply_b64(status.get("out-data", ""), "guest-exec-status"),
        stderr=reply_b64(status.get("err-data", ""), "guest-exec-status"),
        truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
    )

"""An asyncio client for qemu-guest-agent (qemu-ga): the only module that speaks its protocol.

Any backend can give its guests the agent: QEMU on a virtio-serial port whose host side is a
unix socket (``nomad_vm.vm.qemu.agent_channel``); Cloud Hypervisor on a vsock port, reached
through the VMM's hybrid-vsock unix socket and its ``CONNECT`` handshake
(``nomad_vm.vm.hybrid_vsock``). After the connection is open, the protocol is the same. One JSON
command per line, one reply per command, in order; but the channel has no session: replies meant
for a previous client (or our own timed-out requests) may still be in the pipe, and nothing
answers while no agent runs in the guest. So every session, and every call after a timeout,
starts with ``guest-sync-delimited`` and a random id, and everything is discarded until that id
comes back. The guest is untrusted: sizes are bounded. Socket, JSON and agent errors become the
``AgentError`` family (HypervisorError) here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nomad_vm.vm.guest_agent_protocol import (
    AgentCommandError as AgentCommandError,
)
from nomad_vm.vm.guest_agent_protocol import (
    AgentError as AgentError,
)
from nomad_vm.vm.guest_agent_protocol import (
    AgentProtocolError as AgentProtocolError,
)
from nomad_vm.vm.guest_agent_protocol import (
    AgentTimeout as AgentTimeout,
)
from nomad_vm.vm.guest_agent_protocol import (
    AgentUnavailable as AgentUnavailable,
)
from nomad_vm.vm.guest_agent_protocol import (
    ExecResult as ExecResult,
)
from nomad_vm.vm.guest_agent_protocol import (
    encode_command,
    exec_result,
    reply_b64,
    reply_dict,
    reply_int,
    unwrap_reply,
)
from nomad_vm.vm.hybrid_vsock import HybridVsockRefused, open_hybrid_vsock

log = logging.getLogger(__name__)

# The agent's sentinel: 0xFF is never valid UTF-8, so it cannot occur inside a JSON reply. Sent
# by us it flushes the agent's parser; sent by the agent it precedes the guest-sync reply.
_SENTINEL = b"\xff"
# Two streams capped at 16 MiB each by qemu-ga (GUEST_EXEC_MAX_OUTPUT), base64-encoded, fit.
_MAX_MESSAGE = 64 * 2**20
_READ_SIZE = 256 * 2**10
_FILE_CHUNK = 2**20  # bytes per guest-file-read/write round trip (qemu-ga allows up to 48 MiB)
_POLL_FIRST, _POLL_MAX = 0.005, 0.2  # guest-exec-status back-off: short commands return fast
_REAP_TIMEOUT = 5.0
NO_AGENT = "is qemu-guest-agent installed and running in the guest?"
# qemu-ga 7.2 has no command to signal a guest-exec process, so a timed-out one is killed with
# another guest-exec. The tree is stopped top-down before it is killed so that it cannot fork
# replacements; a child left alive would hold the captured stdout open and its record forever.
_KILL_TREE = (
    't() { kill -STOP "$1" 2>/dev/null; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null);'
    ' do t "$c"; done; kill -KILL "$1" 2>/dev/null; }; t "$1"'
)


class GuestAgent:
    """One connection to one VM's agent, shared by all callers (QEMU serves one client at a
    time). Each request/reply pair holds a lock; a failed connection is reopened on next use.

    ``rpc_timeout`` bounds every single request (connect, sync, reply) that has no timeout of
    its own, so that no call waits forever on a guest without an agent.
    """

    def __init__(
        self, socket: Path, *, rpc_timeout: float = 30.0, vsock_port: int | None = None
    ) -> None:
        """``vsock_port``: ``socket`` is a hybrid vsock and the agent listens on that port."""
        self.socket = socket
        self.rpc_timeout = rpc_timeout
        self.vsock_port = vsock_port
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = bytearray()
        # False until a guest-sync came back, and again while a reply may still be in flight.
        self._synced = False
        self._kills: set[asyncio.Task[tuple[bool, str]]] = set()

    async def __aenter__(self) -> GuestAgent:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 5.0) -> None:
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    await self._connect()
            except TimeoutError:
                raise AgentUnavailable(f"no connection to {self.socket} in {timeout}s") from None

    async def close(self) -> None:
        if self._kills:  # kills of cancelled execs need the connection a little longer
            await asyncio.wait(self._kills, timeout=_REAP_TIMEOUT)
        # Not under the lock: a stuck call must not delay close; it fails with AgentUnavailable.
        writer = self._drop()
        if writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()

    def _drop(self) -> asyncio.StreamWriter | None:
        # The next call reconnects and syncs.
        writer, self._reader, self._writer = self._writer, None, None
        self._synced = False
        if writer is not None:
            writer.close()
        return writer

    async def ping(self, timeout: float = 5.0) -> None:
        await self._call("guest-ping", timeout=timeout)

    async def info(self, timeout: float = 5.0) -> dict[str, Any]:
        """guest-info: ``version`` and ``supported_command`` (name, enabled, success-response)."""
        return reply_dict(await self._call("guest-info", timeout=timeout), "guest-info")

    async def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None,
    ) -> ExecResult:
        """Run ``argv`` in the guest (as the agent's user, root) and wait for it to exit.

        ``argv[0]`` is looked up in the agent's PATH. ``env`` REPLACES the whole environment
        (qemu-ga semantics: no PATH unless given). Output is returned only once the process has
        exited (qemu-ga buffers it). On ``timeout`` the process tree is killed, AgentTimeout.
        """
        if not argv:
            raise ValueError("exec needs at least the program to run")
        arguments: dict[str, object] = {
            "path": argv[0], "arg": list(argv[1:]), "capture-output": True,
        }  # fmt: skip
        if env is not None:
            arguments["env"] = [f"{name}={value}" for name, value in env.items()]
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode("ascii")
        started = asyncio.get_running_loop().time()
        pid = reply_int(await self._call("guest-exec", arguments), "pid")
        deadline = None if timeout is None else started + timeout
        try:
            status = await self._wait_exit(pid, deadline)
        except asyncio.CancelledError:
            # The caller gave up (e.g. the exec stream closed): do not leave the process running.
            task = asyncio.get_running_loop().create_task(self._kill_tree(pid))
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)
            raise
        if status is None:
            killed, outcome = await self._kill_tree(pid)
            raise AgentTimeout(
                f"{argv[0]} did not exit within {timeout}s; {outcome}", pid=pid, killed=killed
            )
        return exec_result(status)

    async def _wait_exit(self, pid: int, deadline: float | None) -> dict[str, Any] | None:
        """The exited status of ``pid``, or None at the deadline (the process still runs)."""
        loop = asyncio.get_running_loop()
        interval = _POLL_FIRST
        while True:
            status = reply_dict(
                await self._call("guest-exec-status", {"pid": pid}), "guest-exec-status"
            )
            if status.get("exited"):
                return status
            now = loop.time()
            if deadline is not None and now >= deadline:
                return None
            await asyncio.sleep(interval if deadline is None else min(interval, deadline - now))
            interval = min(interval * 2, _POLL_MAX)

    async def _kill_tree(self, pid: int) -> tuple[bool, str]:
        """Kill a guest-exec process and its descendants; (killed, what happened)."""
        script = {"path": "/bin/sh", "arg": ["-c", _KILL_TREE, "kill", str(pid)]}
        try:
            killer = reply_int(await self._call("guest-exec", script), "pid")
            loop = asyncio.get_running_loop()
            # Both records stay in the agent until their exited status is read: collect them.
            for reaped in (killer, pid):
                if await self._wait_exit(reaped, loop.time() + _REAP_TIMEOUT) is None:
                    return False, f"guest pid {pid} still runs after kill -KILL"
        except AgentError as exc:
            return False, f"could not kill guest pid {pid}: {exc}"
        return True, f"killed guest pid {pid} and its descendants"

    async def file_read(self, path: str, *, max_bytes: int = 16 * 2**20) -> bytes:
        """The whole content of a guest file; AgentError if it exceeds ``max_bytes``."""
        handle = reply_int(await self._call("guest-file-open", {"path": path, "mode": "r"}))
        content = bytearray()
        try:
            while True:
                args = {"handle": handle, "count": min(_FILE_CHUNK, max_bytes + 1 - len(content))}
                reply = reply_dict(await self._call("guest-file-read", args), "guest-file-read")
                content += (data := reply_b64(reply.get("buf-b64", ""), "guest-file-read"))
                if len(content) > max_bytes:
                    raise AgentError(f"guest file {path} is larger than {max_bytes} bytes")
                if reply.get("eof") or not data:
                    return bytes(content)
        finally:
            with contextlib.suppress(AgentError):
                await self._call("guest-file-close", {"handle": handle})

    async def file_write(self, path: str, data: bytes, *, mode: str = "w") -> None:
        """Write ``data`` to a guest file (``mode`` as fopen: "w" truncates, "a" appends)."""
        handle = reply_int(await self._call("guest-file-open", {"path": path, "mode": mode}))
        try:
            offset = 0
            while offset < len(data):
                chunk = data[offset : offset + _FILE_CHUNK]
                args = {"handle": handle, "buf-b64": base64.b64encode(chunk).decode("ascii")}
                written = reply_int(await self._call("guest-file-write", args), "count")
                if written <= 0:
                    raise AgentError(f"guest file {path}: the agent wrote nothing")
                offset += written
        except BaseException:
            with contextlib.suppress(AgentError):
                await self._call("guest-file-close", {"handle": handle})
            raise
        # The agent's fclose flushes: its error means the data may not be there.
        await self._call("guest-file-close", {"handle": handle})

    async def shutdown(self, mode: str = "powerdown", confirm: float = 2.0) -> None:
        """Ask the guest OS to power down, halt or reboot. The agent answers only on failure,
        so silence for ``confirm`` seconds counts as accepted."""
        await self._call("guest-shutdown", {"mode": mode}, reply_optional=confirm)

    async def _call(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        reply_optional: float | None = None,
    ) -> Any:
        """Send one command and return its ``return`` value (sync first when needed).

        With ``reply_optional``, a command the agent does not answer on success (guest-shutdown)
        returns None after that many seconds of silence.
        """
        limit = self.rpc_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        phase = "lock"
        try:
            async with asyncio.timeout(limit), self._lock:
                phase = "connect"
                await self._connect()
                if not self._synced:
                    phase = "sync"
                    await self._sync()
                phase = command
                self._synced = False  # until its reply is in, a late one could follow
                await self._send(encode_command(command, arguments))
                try:
                    async with asyncio.timeout(reply_optional):
                        reply = await self._read_reply(command)
                except TimeoutError:
                    if reply_optional is None:
                        raise
                    return None  # silence was the answer
                self._synced = True
        except TimeoutError:
            raise self._timeout_error(phase, command, limit) from None
        log.debug("guest agent %s: %.1f ms", command, (loop.time() - started) * 1000)
        return unwrap_reply(command, reply)

    def _timeout_error(self, phase: str, command: str, limit: float) -> AgentUnavailable:
        return AgentUnavailable(
            {
                "lock": f"the guest agent stayed busy with other calls for {limit:g}s",
                "connect": f"cannot connect to the guest agent at {self.socket}",
                "sync": f"no answer from the guest agent within {limit:g}s: {NO_AGENT}",
            }.get(phase, f"the guest agent did not answer {command} within {limit:g}s")
        )

    async def _connect(self) -> None:
        if self._writer is not None:
            return
        try:
            if self.vsock_port is None:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.socket), limit=_READ_SIZE
                )
            else:
                self._reader, self._writer = await open_hybrid_vsock(
                    self.socket, self.vsock_port, limit=_READ_SIZE
                )
        except (OSError, HybridVsockRefused) as exc:
            message = f"cannot connect to the guest agent at {self.socket}: {exc}"
            raise AgentUnavailable(message) from exc
        self._buffer.clear()
        self._synced = False

    async def _sync(self) -> None:
        token = secrets.randbits(48)
        # Our 0xFF makes the agent drop a partial command a previous client may have left.
        await self._send(_SENTINEL + encode_command("guest-sync-delimited", {"id": token}))
        while True:
            # Everything before the agent's own 0xFF is stale.
            while (mark := self._buffer.find(_SENTINEL)) < 0:
                self._buffer.clear()
                await self._fill()
            del self._buffer[: mark + 1]
            line = await self._read_line()
            # A stale partial line followed by our sentinel: keep what follows the last 0xFF.
            line = line[line.rfind(_SENTINEL) + 1 :]
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                if isinstance(reply, dict) and reply.get("return") == token:
                    self._synced = True
                    return

    async def _read_reply(self, command: str) -> dict[str, Any]:
        line = b""
        while not line.strip():
            line = await self._read_line()
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise AgentProtocolError(f"guest agent sent non-JSON for {command}: {exc}") from None
        if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
            raise AgentProtocolError(f"guest agent sent {line[:200]!r} for {command}")
        return reply

    async def _read_line(self) -> bytes:
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            start = len(self._buffer)
            if start > _MAX_MESSAGE:
                self._drop()
                raise AgentProtocolError(f"guest agent message exceeds {_MAX_MESSAGE} bytes")
            await self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    async def _fill(self) -> None:
        reader = self._reader
        if reader is None:
            raise AgentUnavailable("the guest agent connection was closed")
        try:
            data = await reader.read(_READ_SIZE)
        except OSError as exc:
            self._drop()
            raise AgentUnavailable(f"guest agent connection failed: {exc}") from exc
        if not data:
            self._drop()
            raise AgentUnavailable("QEMU closed the guest agent socket (has the VM stopped?)")
        self._buffer += data

    async def _send(self, message: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise AgentUnavailable("the guest agent connection was closed")
        try:
            writer.write(message)
            await writer.drain()
        except OSError as exc:
            self._drop()
            raise AgentUnavailable(f"guest agent connection failed: {exc}") from exc

"""Typed wrappers over qemu.qmp: the only module that talks QMP.

QMP errors are translated to HypervisorError here and never cross this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from nomad_vm.errors import HypervisorError

log = logging.getLogger(__name__)

# qemu.qmp logs every message at DEBUG; that is noise in Nomad's agent log.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)

# The events that change what the VM is doing; everything else (RTC_CHANGE, ...) is ignored.
LIFECYCLE_EVENTS = ("SHUTDOWN", "RESET", "GUEST_PANICKED", "POWERDOWN", "STOP", "RESUME")


@dataclass(frozen=True)
class QemuEvent:
    name: str
    data: dict[str, object] = field(default_factory=dict)


# Seconds any QMP command may take: QEMU answers its commands at once (the long operations,
# e.g. migrate, run in the background and are polled).
COMMAND_TIMEOUT = 30.0


class QemuMonitor:
    """One QMP connection held for a VM's lifetime: commands and lifecycle events.

    QEMU's QMP socket serves one client at a time, so the driver keeps exactly one.
    """

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._client = QMPClient(f"qmp:{socket.parent.name}")
        # The client's default listener keeps every event it accepts forever (its history), and
        # cannot be removed: narrow it to the rare lifecycle events instead.
        self._listener = self._client.events
        self._listener.names = set(LIFECYCLE_EVENTS)
        # A descriptor sent waits in QEMU for the next getfd; two in flight would swap.
        self._fd_lock = asyncio.Lock()

    async def connect(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._client.connect(str(self.socket)), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise HypervisorError(f"cannot connect to QMP at {self.socket}: {exc}") from exc

    async def execute(
        self,
        command: str,
        arguments: dict[str, object] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> object:
        """QEMU's reply; HypervisorError when it fails or does not come within ``timeout``
        (a VMM that stopped answering must not hold an RPC of Nomad's forever: a RecoverTask
        that never returned once left its allocation pending)."""
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except TimeoutError as exc:
            raise HypervisorError(f"QMP {command}: no answer within {timeout:g}s") from exc
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"QMP {command} failed: {exc}") from exc

    async def send_fd(self, name: str, fd: int) -> None:
        """Give QEMU a copy of ``fd`` under ``name`` (QMP getfd), for a later command that
        takes a descriptor by name; QEMU needs no access to what it refers to."""
        async with self._fd_lock:
            try:
                self._client.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise HypervisorError(f"cannot pass a descriptor to QEMU: {exc}") from exc
            await self.execute("getfd", {"fdname": name})

    async def status(self) -> str:
        """QEMU's run state, e.g. ``running``, ``shutdown`` or ``guest-panicked``."""
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise HypervisorError(f"unexpected QMP query-status reply: {reply!r}")
        return str(reply["status"])

    async def next_event(self) -> QemuEvent:
        """The next lifecycle event; waits forever once QEMU is gone (callers cancel)."""
        message = await self._listener.get()
        data = message.get("data") or {}
        return QemuEvent(str(message["event"]), dict(data) if isinstance(data, dict) else {})

    async def close(self) -> None:
        # After QEMU exits the session ends with whatever the reader hit (EOFError, resets).
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()


async def connect_when_ready(
    socket: Path, still_running: Callable[[], Awaitable[bool]], timeout: float
) -> tuple[QemuMonitor, str]:
    """Poll until QMP answers ``query-status``; fail early when the VMM has exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = "socket not created yet"
    while loop.time() < deadline:
        if not await still_running():
            raise HypervisorError("the VMM exited before its QMP socket answered")
        if socket.exists():
            monitor = QemuMonitor(socket)
            try:
                await monitor.connect()
                return monitor, await monitor.status()
            except HypervisorError as exc:
                last_error = str(exc)
                await monitor.close()
        await asyncio.sleep(0.02)
    raise HypervisorError(f"QMP did not answer within {timeout:.0f}s: {last_error}")

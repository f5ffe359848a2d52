"""Typed wrappers over qemu.qmp: the only module that talks QMP.

QMP errors are translated to HypervisorError here and never cross this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from nomad_vm.errors import HypervisorError

log = logging.getLogger(__name__)

# qemu.qmp logs every message at DEBUG; that is noise in Nomad's agent log.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


@contextlib.asynccontextmanager
async def qmp_session(socket: Path, timeout: float = 5.0) -> AsyncIterator[QMPClient]:
    client = QMPClient(f"qmp:{socket.name}")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
    except (QMPError, OSError, TimeoutError) as exc:
        raise HypervisorError(f"cannot connect to QMP at {socket}: {exc}") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(QMPError, OSError):
            await client.disconnect()


async def query_status(socket: Path) -> str:
    """QEMU's run state, e.g. ``running`` or ``paused``."""
    async with qmp_session(socket) as client:
        try:
            reply = await client.execute("query-status")
        except QMPError as exc:
            raise HypervisorError(f"QMP query-status failed: {exc}") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
        raise HypervisorError(f"unexpected QMP query-status reply: {reply!r}")
    return str(reply["status"])


async def wait_for_qmp(
    socket: Path, still_running: Callable[[], Awaitable[bool]], timeout: float
) -> str:
    """Poll until QMP answers ``query-status``; fail early when the VMM has exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = "socket not created yet"
    while loop.time() < deadline:
        if not await still_running():
            raise HypervisorError("the VMM exited before its QMP socket answered")
        if socket.exists():
            try:
                return await query_status(socket)
            except HypervisorError as exc:
                last_error = str(exc)
        await asyncio.sleep(0.02)
    raise HypervisorError(f"QMP did not answer within {timeout:.0f}s: {last_error}")

"""A QEMU that stops answering QMP fails the command after its timeout instead of holding the
caller (a RecoverTask of Nomad's once never returned: its allocation stayed pending)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.qemu.monitor import QemuMonitor

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
        "capabilities": ["oob"],
    }
}


async def silent_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greets and negotiates like QEMU, then answers nothing more."""
    writer.write(json.dumps(GREETING).encode() + b"\r\n")
    await writer.drain()
    request = json.loads(await reader.read(4096))  # qemu.qmp ends a command with no newline
    assert request["execute"] == "qmp_capabilities"
    reply: dict[str, object] = {"return": {}}
    if "id" in request:
        reply["id"] = request["id"]
    writer.write(json.dumps(reply).encode() + b"\r\n")
    await writer.drain()
    await reader.read()  # until the client goes


def test_a_command_qemu_never_answers_fails_after_its_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        socket = tmp_path / "qmp.sock"
        server = await asyncio.start_unix_server(silent_qemu, path=str(socket))
        monitor = QemuMonitor(socket)
        try:
            await monitor.connect()
            with pytest.raises(HypervisorError, match=r"query-status: no answer within 0\.2s"):
                await monitor.execute("query-status", timeout=0.2)
        finally:
            await monitor.close()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), 20))

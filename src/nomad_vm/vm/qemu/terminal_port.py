"""A virtio-serial port hot-plugged for one interactive session, and unplugged after it.

The port sits on the guest agent's virtio-serial bus (``agent_argv``); its host side is a unix
socket QEMU listens on in the task's runtime directory. Each session gets its own random id, so a
port left behind by a plugin that died mid-session can never be confused with a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.qemu.agent import SERIAL_BUS
from nomad_vm.vm.qemu.monitor import QemuMonitor

NAME_PREFIX = "org.nomadvm.tty."
_UNPLUG_WAIT = 5.0  # seconds for the guest to release the port before its chardev is removed


@dataclass(frozen=True)
class TerminalPort:
    token: str
    socket: Path

    @property
    def name(self) -> str:
        """The port's name as the guest sees it in /sys/class/virtio-ports/*/name."""
        return NAME_PREFIX + self.token

    @property
    def chardev_id(self) -> str:
        return f"tty-{self.token}"

    @property
    def device_id(self) -> str:
        return f"ttyport-{self.token}"


async def plug_terminal_port(monitor: QemuMonitor, runtime_dir: Path) -> TerminalPort:
    port = TerminalPort(secrets.token_hex(4), runtime_dir / f"tty-{secrets.token_hex(4)}.sock")
    await monitor.execute(
        "chardev-add",
        {
            "id": port.chardev_id,
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(port.socket)}},
                    "server": True,
                    "wait": False,
                },
            },
        },
    )
    try:
        await monitor.execute(
            "device_add",
            {
                "driver": "virtserialport",
                "bus": f"{SERIAL_BUS}.0",
                "chardev": port.chardev_id,
                "name": port.name,
                "id": port.device_id,
            },
        )
    except HypervisorError:
        await _remove_chardev(monitor, port)
        raise
    return port


async def unplug_terminal_port(monitor: QemuMonitor, port: TerminalPort) -> None:
    """Remove the port and its socket; QEMU keeps the chardev busy until the device is gone."""
    with contextlib.suppress(HypervisorError):
        await monitor.execute("device_del", {"id": port.device_id})
    await _remove_chardev(monitor, port)


async def _remove_chardev(monitor: QemuMonitor, port: TerminalPort) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _UNPLUG_WAIT
    while True:
        try:
            await monitor.execute("chardev-remove", {"id": port.chardev_id})
            break
        except HypervisorError:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
    port.socket.unlink(missing_ok=True)

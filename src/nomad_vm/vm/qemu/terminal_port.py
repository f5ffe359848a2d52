"""A virtio-serial port hot-plugged for one interactive session, and unplugged after it.

The port sits on the guest agent's virtio-serial bus (``agent_argv``); its host side is a unix
socket in the task's runtime directory, bound by the plugin and handed to QEMU as a listening
descriptor (QEMU runs as ``vm_user`` and cannot create anything there). Each session gets its
own random id, so a port left behind by a plugin that died mid-session can never be confused
with a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.handover import listen_at
from nomad_vm.vm.hypervisor import TerminalPort
from nomad_vm.vm.qemu.agent_channel import SERIAL_BUS
from nomad_vm.vm.qemu.monitor import QemuMonitor

NAME_PREFIX = "org.nomadvm.tty."
_UNPLUG_WAIT = 5.0  # seconds for the guest to release the port before its chardev is removed


def _chardev_id(port: TerminalPort) -> str:
    return f"tty-{port.token}"


def _device_id(port: TerminalPort) -> str:
    return f"ttyport-{port.token}"


async def plug_terminal_port(monitor: QemuMonitor, runtime_dir: Path) -> TerminalPort:
    token = secrets.token_hex(4)
    socket = runtime_dir / f"tty-{secrets.token_hex(4)}.sock"
    port = TerminalPort(token, NAME_PREFIX + token, socket)
    listener = listen_at(socket)
    try:
        await monitor.send_fd(_chardev_id(port), listener.fileno())
        await monitor.execute(
            "chardev-add",
            {
                "id": _chardev_id(port),
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "fd", "data": {"str": _chardev_id(port)}},
                        "server": True,
                        "wait": False,
                    },
                },
            },
        )
    except HypervisorError:
        # chardev-add takes the named descriptor; when it failed, QEMU still holds it.
        with contextlib.suppress(HypervisorError):
            await monitor.execute("closefd", {"fdname": _chardev_id(port)})
        socket.unlink(missing_ok=True)
        raise
    finally:
        listener.close()  # QEMU has its own copy
    try:
        await monitor.execute(
            "device_add",
            {
                "driver": "virtserialport",
                "bus": f"{SERIAL_BUS}.0",
                "chardev": _chardev_id(port),
                "name": port.name,
                "id": _device_id(port),
            },
        )
    except HypervisorError:
        await _remove_chardev(monitor, port)
        raise
    return port


async def unplug_terminal_port(monitor: QemuMonitor, port: TerminalPort) -> None:
    """Remove the port and its socket; QEMU keeps the chardev busy until the device is gone."""
    with contextlib.suppress(HypervisorError):
        await monitor.execute("device_del", {"id": _device_id(port)})
    await _remove_chardev(monitor, port)


async def _remove_chardev(monitor: QemuMonitor, port: TerminalPort) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _UNPLUG_WAIT
    while True:
        try:
            await monitor.execute("chardev-remove", {"id": _chardev_id(port)})
            break
        except HypervisorError:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
    port.socket.unlink(missing_ok=True)

"""QEMU's side of the guest agent channel: the virtio-serial port qemu-guest-agent listens on.

The agent in the guest opens the port named ``org.qemu.guest_agent.0``; its host side is a unix
socket QEMU listens on, which ``nomad_vm.vm.guest_agent.GuestAgent`` connects to. Interactive
sessions hot-plug their own ports on the same bus (``terminal_port``).
"""

from __future__ import annotations

from pathlib import Path

PORT_NAME = "org.qemu.guest_agent.0"
# The virtio-serial controller the agent's port sits on; interactive sessions hot-plug theirs here.
SERIAL_BUS = "qga-serial"


def agent_argv(socket: Path, microvm: bool = False, fd: int | None = None) -> list[str]:
    """QEMU arguments for the agent's port, its host side a unix socket QEMU listens on: at
    ``socket``, or on ``fd``, a socket already listening there (bound by the driver)."""
    # Commas separate QEMU option properties; a literal one in the path is written twice.
    where = f"fd={fd}" if fd is not None else "path=" + str(socket).replace(",", ",,")
    # microvm has no PCI bus, only virtio-mmio transports.
    bus = "virtio-serial-device" if microvm else "virtio-serial-pci"
    return [
        "-chardev", f"socket,{where},server=on,wait=off,id=qga0",
        "-device", f"{bus},id={SERIAL_BUS}",
        "-device", f"virtserialport,bus={SERIAL_BUS}.0,chardev=qga0,name={PORT_NAME}",
    ]  # fmt: skip

"""A graphical console: the display adapter and QEMU's VNC server on a handed unix socket.

QEMU runs as ``vm_user`` and cannot create a socket in the task's runtime directory (root's,
0700), and ``-vnc`` takes only a path or a TCP address, never a descriptor. So QEMU starts
with ``-vnc none`` (the VNC server exists, listening nowhere), and once QMP answers the
plugin binds ``vnc.sock`` itself and hands the listening descriptor over (``getfd``), then
points the VNC server at it with ``display-update`` (a SocketAddress of type ``fd``; QEMU
7.2 takes it). Nothing listens on TCP. The socket's directory is root's alone, so only root
(the console server, ``nomad-vm console serve``) can connect; QEMU's VNC needs no password.
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.errors import HypervisorError, VMRequestError
from nomad_vm.vm.handover import listen_at
from nomad_vm.vm.qemu.monitor import QemuMonitor

VNC_SOCKET = "vnc.sock"
# The task option's values -> QEMU's display adapter. "vga" is QEMU's standard VGA (Bochs
# VBE: text mode for BIOS and kernel consoles, a framebuffer for everything else, drivers in
# every OS); "virtio" is virtio-vga: virtio-gpu with a VGA compatible front, so firmware and
# early boot still show before the guest's virtio-gpu driver takes over.
ADAPTERS = {"vga": "VGA", "virtio": "virtio-vga"}
DISPLAYS = ("none", *ADAPTERS)
_FD_NAME = "vnc-listener"
# How many connections may wait to be accepted (a browser reconnecting, a second viewer).
_BACKLOG = 4


def check_display(display: str, machine: str) -> None:
    """VMRequestError naming ``display`` for a display the machine cannot have."""
    if display == "none":
        return
    if display not in ADAPTERS:
        raise VMRequestError("display", f"{display!r} is not one of {', '.join(DISPLAYS)}")
    if machine == "microvm":
        raise VMRequestError(
            "display", f"{display!r} needs a PCI bus, which microvm does not have; use pc or q35"
        )


def display_argv(display: str) -> list[str]:
    """The adapter and a VNC server that listens nowhere yet (``serve_vnc`` points it)."""
    if display == "none":
        return []
    return ["-device", f"{ADAPTERS[display]},id=video0", "-vnc", "none"]


async def serve_vnc(monitor: QemuMonitor, path: Path) -> None:
    """Bind ``path`` and make QEMU's VNC server accept on it."""
    listener = listen_at(path, _BACKLOG)
    try:
        await monitor.send_fd(_FD_NAME, listener.fileno())
        await monitor.execute(
            "display-update",
            {"type": "vnc", "addresses": [{"type": "fd", "str": _FD_NAME}]},
        )
    except HypervisorError:
        path.unlink(missing_ok=True)
        raise
    finally:
        listener.close()  # QEMU holds its own copy

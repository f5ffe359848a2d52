"""What a running VM is, as its VMM reports it: for the operator view (`nomad-vm vm info`).

Asked of the VMM rather than taken from the task's config, so that it shows what really runs
(the accelerator QEMU ended up with, memory hot-plugged since, the files behind each disk).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiskView:
    # The VMM's name for the device (QEMU's qdev id, CH's disk id).
    name: str
    # The file the VMM reads (a descriptor handed over is resolved to the file it refers to).
    file: str
    read_only: bool = False
    # Image format as the VMM uses it (qcow2, raw); "" when it does not say.
    format: str = ""
    # The image an overlay reads through to (its backing file), "" when none.
    backing: str = ""


@dataclass(frozen=True)
class VMDescription:
    accelerator: str
    vcpus: int
    memory_bytes: int
    # Memory added while the VM runs (DIMMs, virtio-mem); 0 when none.
    plugged_memory_bytes: int = 0
    disks: tuple[DiskView, ...] = ()
    # The VNC server's unix socket when the VM has a display.
    vnc_socket: str | None = None

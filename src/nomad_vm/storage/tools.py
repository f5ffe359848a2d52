"""Where the storage tools are: qemu-img, which makes and checks every task's disk whatever
hypervisor runs the VM."""

from __future__ import annotations

from pathlib import Path

from nomad_vm.executables import find_executable

QEMU_IMG = "qemu-img"
QEMU_IMG_HINT = "install Debian's qemu-utils"


def find_qemu_img(configured: str | None = None) -> Path:
    """The image tool: ``configured`` (a path or a name on PATH), else qemu-img."""
    return find_executable(configured, QEMU_IMG, "qemu-img", QEMU_IMG_HINT)

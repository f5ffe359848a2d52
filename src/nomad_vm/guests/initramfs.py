"""Assemble a busybox initramfs tree and pack it as a newc cpio archive.

The archive is left uncompressed: it is about 2.5 MB, QEMU copies it into guest RAM as is, and
the kernel then skips a decompression that would cost time under TCG.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nomad_vm.errors import GuestBuildError
from nomad_vm.guests.kernel import KernelModule

# Directories the init script mounts on or writes to. /dev/console itself comes from the
# kernel's built-in initramfs (Debian builds with CONFIG_INITRAMFS_SOURCE=""), so the archive
# needs no device node and the build needs no root.
TREE_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "root",
    "etc",
    "etc/nomad-vm",
    "lib/modules",
    "run",
    "var/log",
)

MODULE_ORDER_FILE = "etc/nomad-vm/modules"


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets (``bin/sh``, ``sbin/poweroff``, ...).

    Asks the binary itself (``--list-full``); it is static, so it runs on any x86-64 host.
    """
    try:
        result = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise GuestBuildError(
            f"could not list the applets of {busybox} ({exc}); the busybox-static package must "
            "match the host architecture (x86-64)"
        ) from exc
    applets = [line.strip().lstrip("/") for line in result.stdout.splitlines() if line.strip()]
    if "bin/sh" not in applets:
        raise GuestBuildError(f"{busybox} has no sh applet; cannot run the guest's /init")
    return applets


def stage_tree(
    root: Path, *, busybox: Path, init_script: bytes, modules: Sequence[KernelModule]
) -> None:
    """Lay out the guest's root file system under ``root`` (which must be empty)."""
    for directory in TREE_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)

    target = root / "bin" / "busybox"
    target.write_bytes(busybox.read_bytes())
    target.chmod(0o755)
    for applet in busybox_applets(busybox):
        link = root / applet
        if link == target or os.path.lexists(link):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")

    init = root / "init"
    init.write_bytes(init_script)
    init.chmod(0o755)

    for module in modules:
        (root / "lib" / "modules" / f"{module.name}.ko").write_bytes(module.data)
    order = "".join(f"{module.name}\n" for module in modules)
    (root / MODULE_ORDER_FILE).write_text(order)


def write_cpio(root: Path, output: Path) -> None:
    """Pack ``root`` into ``output`` with GNU ``cpio -o -H newc`` (the format the kernel reads).

    Entries are sorted and owned by root:root, whatever user runs the build.
    """
    names = sorted(
        os.path.relpath(os.path.join(directory, name), root)
        for directory, dirs, files in os.walk(root)
        for name in (*dirs, *files)
    )
    listing = b"".join(name.encode() + b"\0" for name in names)
    argv = ["cpio", "-o", "-0", "-H", "newc", "--quiet", "--reproducible", "-R", "0:0"]
    try:
        with output.open("wb") as archive:
            subprocess.run(
                argv, cwd=root, input=listing, stdout=archive, stderr=subprocess.PIPE, check=True
            )
    except FileNotFoundError as exc:
        raise GuestBuildError(
            "building the initramfs needs GNU cpio: install the Debian package `cpio`"
        ) from exc
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(
            f"cpio failed with status {exc.returncode}: {exc.stderr.decode(errors='replace')}"
        ) from exc

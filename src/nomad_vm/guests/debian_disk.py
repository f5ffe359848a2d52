"""The Debian guest's disk: one partitionless ext4 file system labelled ``root``.

``mkfs.ext4 -d`` copies the finished tree into a new raw file system image without mounting
anything. The only mount is a loop mount of that image for ``extlinux --install``, which needs
the file system mounted to find where ldlinux.sys lies on disk; extlinux then writes its boot
sector to the image's first sector, so SeaBIOS boots the disk alone. The raw image (sparse,
several GB apparent size) is converted to qcow2 and deleted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nomad_vm.errors import GuestBuildError
from nomad_vm.guests.debian_rootfs import run_logged, unmount_under

ROOT_LABEL = "root"
DISK_SIZE = "3G"
EXTLINUX_DIR = "boot/extlinux"
_EXTLINUX_HINT = "install it with `apt-get install extlinux` (scripts/setup-host.sh does)"


def extlinux_config(cmdline: str) -> str:
    """Boot the guest's current kernel at once, with the console on the first serial port.

    /vmlinuz and /initrd.img are the symlinks Debian's kernel packages keep pointing at the
    newest kernel, so an upgrade inside the guest keeps the disk bootable.
    """
    return (
        "# Written by nomad-vm when the image was built.\n"
        "SERIAL 0 115200\n"
        "DEFAULT debian\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL debian\n"
        "  LINUX /vmlinuz\n"
        "  INITRD /initrd.img\n"
        f"  APPEND {cmdline}\n"
    )


def make_disk(tree: Path, qcow2: Path, *, cmdline: str, compress: bool, log: Path) -> None:
    """Build ``qcow2`` from ``tree``; the raw intermediate lives next to it and is removed."""
    extlinux_dir = tree / EXTLINUX_DIR
    extlinux_dir.mkdir(parents=True, exist_ok=True)
    (extlinux_dir / "extlinux.conf").write_text(extlinux_config(cmdline))
    raw = qcow2.with_suffix(".raw")
    try:
        run_logged(
            ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(tree), str(raw), DISK_SIZE],
            log,
            what="creating the guest's ext4 file system",
            hint="install e2fsprogs >= 1.43 (for mkfs -d) and check free space",
        )
        install_extlinux(raw, log)
        argv = ["qemu-img", "convert", "-O", "qcow2"]
        # -W -m 8: compress clusters in parallel; single-threaded it takes several times longer.
        argv += ["-c", "-W", "-m", "8"] if compress else []
        run_logged(
            [*argv, str(raw), str(qcow2)],
            log,
            what="converting the guest disk to qcow2",
            hint="install qemu-utils and check free space",
        )
    finally:
        raw.unlink(missing_ok=True)


def install_extlinux(raw: Path, log: Path) -> None:
    """Make a partitionless ext4 image bootable by BIOS firmware."""
    mountpoint = Path(tempfile.mkdtemp(prefix="mnt-", dir=raw.parent))
    try:
        run_logged(
            ["mount", "-o", "loop", str(raw), str(mountpoint)],
            log,
            what="loop-mounting the guest disk for extlinux",
            hint="the build needs root and a free loop device (/dev/loop*)",
        )
        run_logged(
            ["extlinux", "--install", str(mountpoint / EXTLINUX_DIR)],
            log,
            what="installing the extlinux boot loader",
            hint=_EXTLINUX_HINT,
        )
    finally:
        # mount -o loop sets autoclear: unmounting also frees the loop device.
        unmount_under(mountpoint)
    try:
        mountpoint.rmdir()
    except OSError as exc:
        raise GuestBuildError(f"{mountpoint} is still in use after unmounting: {exc}") from exc

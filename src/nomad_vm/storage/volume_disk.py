"""The host side of a disk backed by a Nomad volume: what is at the volume_mount's host path.

* A regular file or a block device is the disk itself.
* A directory holds the disk as ``nomad-vm-disk.<format>`` (``disk_file_name``), made by the
  plugin on first use and reused afterwards, so the disk lives as long as the volume.

The host path comes from Nomad (the operator's host volume), but what is inside a directory
volume may have been put there by anyone who mounts the volume (another task, a raw_exec
job), so the disk file is opened below the directory through no symlink (``beneath``): a
symlink planted under the disk's name is refused, never followed, and so is a file with a
second hard link. A new disk file is made
under a hidden name by descriptor (``O_CREAT|O_EXCL``, written by qemu-img through
``/proc/self/fd``) and published with ``linkat``, which never replaces a disk another task
made meanwhile; the caller journals the hidden name first (a failed start's replay removes
it) and the published file as kept. The host path must not lead into the plugin's state.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.beneath import REFUSED_WALK, open_beneath
from nomad_vm.storage.held import FileHolder, HeldFile
from nomad_vm.storage.paths import Allowlist, check_real_path

DISK_STEM = "nomad-vm-disk"


def disk_file_name(fmt: str) -> str:
    """The disk's file in a directory volume (the format is in the name, never probed)."""
    return f"{DISK_STEM}.{fmt}"


@dataclass(frozen=True)
class VolumeRoot:
    """The mount's host path, opened ``O_PATH`` (``held``); ``kind``: dir, file or block."""

    held: HeldFile
    kind: str


def open_volume_root(field: str, host: Path, private: Allowlist, holder: FileHolder) -> VolumeRoot:
    """The volume_mount's host path as it is now (a directory, regular file or block
    device), refused when it leads into the plugin's own state (``private.private``)."""
    try:
        fd = os.open(host, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(field, f"the volume's host path {host}: {exc.strerror or exc}") from None
    held = holder.add(HeldFile(host, fd))
    real = Path(os.readlink(held.proc_path))
    check_real_path(
        field,
        real,
        Allowlist(roots=(str(real),), private=private.private),
        subject=f"the volume's host path {host}",
        advice="",
    )
    mode = held.fstat().st_mode
    if stat.S_ISDIR(mode):
        return VolumeRoot(HeldFile(real, fd), "dir")
    if stat.S_ISREG(mode):
        return VolumeRoot(HeldFile(real, fd), "file")
    if stat.S_ISBLK(mode):
        return VolumeRoot(HeldFile(real, fd), "block")
    raise ImageError(
        field, f"the volume's host path {real} is not a directory, file or block device"
    )


def find_disk_file(field: str, root: VolumeRoot, name: str, holder: FileHolder) -> HeldFile | None:
    """``name`` in the directory volume, opened ``O_PATH`` below it through no symlink; None
    when there is none yet."""
    try:
        fd = open_beneath(root.held.fd, name, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno in REFUSED_WALK:
            raise ImageError(
                field,
                f"{root.held.path / name} is a symlink; nomad-vm does not follow one in a "
                "volume (remove it, and the disk is made there on first use)",
            ) from None
        raise ImageError(field, f"cannot open {root.held.path / name}: {exc.strerror}") from None
    held = holder.add(HeldFile(root.held.path / name, fd))
    links = held.fstat().st_nlink
    if links != 1:
        # The file nomad-vm makes has one name. A second one is a hard link someone made to
        # another file (as root: fs.protected_hardlinks stops others), which would hand the
        # guest that file.
        raise ImageError(
            field,
            f"{held.path} has {links} hard links; a volume's disk file must have one (a link "
            "to another file would give the guest that file)",
        )
    return held


def reopen(field: str, probe: HeldFile, holder: FileHolder, *, writable: bool) -> HeldFile:
    """The disk itself (a regular file or block device), opened for QEMU from ``probe``'s
    ``O_PATH`` descriptor (the same inode: the magic link walks no path)."""
    mode = probe.fstat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ImageError(field, f"{probe.path} is not a regular file or block device")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(probe.proc_path, flags)
    except OSError as exc:
        how = "read-write" if writable else "read-only"
        raise ImageError(field, f"cannot open {probe.path} {how}: {exc.strerror or exc}") from None
    return holder.add(HeldFile(probe.path, fd, writable))


def is_block_device(held: HeldFile) -> bool:
    return stat.S_ISBLK(held.fstat().st_mode)


def make_disk_file(
    qemu_img_path: Path,
    root: VolumeRoot,
    temp: str,
    name: str,
    fmt: str,
    size_bytes: int,
    *,
    sparse: bool,
) -> bool:
    """An empty ``fmt`` disk made under the hidden name ``temp`` in the directory volume and
    published as ``name``; False when a disk of that name appeared meanwhile (ours is dropped,
    theirs is used). The hidden file is gone either way."""
    dir_fd = root.held.fd
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    try:
        with FileHolder() as own:
            held = own.add(HeldFile(root.held.path / temp, fd, True))
            qemu_img.create(qemu_img_path, held, fmt, size_bytes, falloc=not sparse)
            os.fsync(held.fd)
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
    _sync_dir(root)
    return True


def _sync_dir(root: VolumeRoot) -> None:
    """The new name survives a host crash (an O_PATH descriptor cannot be fsynced)."""
    fd = os.open(root.held.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

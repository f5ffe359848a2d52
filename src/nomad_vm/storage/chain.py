"""The backing chain of a job's image, walked one file at a time, each checked before use.

Each file an image names (a backing file, a vmdk extent) must be a plain file inside the
allowlist with a recorded format. The chain is walked with ``qemu-img info`` *without*
``--backing-chain`` (which would open each backing file, an ``nbd://`` URL or a blocking FIFO
included, before we can look at it). Every file is opened once (``held.open_allowed``, checked
on the descriptor) and read only through that descriptor afterwards; ``ImageInfo.held`` is it.
See ``nomad_vm.storage.disk`` for what is made of the chain.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from nomad_vm.errors import ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.file_versions import FileVersion, VersionMemo
from nomad_vm.storage.held import FileHolder, HeldFile, open_allowed
from nomad_vm.storage.limits import USER_IMAGE_LIMITS, Limits
from nomad_vm.storage.paths import AllowedDirs
from nomad_vm.storage.qemu_img import ImageInfo
from nomad_vm.storage.qemu_img_run import QemuImgError, QemuImgLimitExceeded

# What qemu-img says when a vmdk descriptor read through /proc/self/fd/N names an extent file:
# its name is taken relative to /proc/self/fd/ (and is not a descriptor number).
_SEPARATE_EXTENT = re.compile(r"Could not open '/proc/self/fd/(?!\d+')")
# Used in place (thin) and read directly (copy).
SHARED_FORMATS = frozenset({"raw", "qcow2"})
# Readable by qemu-img, but only ever converted into a private qcow2.
CONVERTED_FORMATS = frozenset({"vmdk", "vdi", "vhdx", "vpc", "qed"})
# A real chain is a handful of files; a longer one is a loop qemu-img did not see or an attack.
MAX_CHAIN_LENGTH = 16
_SEPARATE_EXTENTS = (
    "a vmdk that keeps its data in separate extent files cannot be used: nomad-vm reads every "
    "image file only through the one descriptor it checked. Make a single-file image: "
    "`qemu-img convert -O qcow2 IMAGE NEW.qcow2`"
)
# What qemu-img info said about each user file version (and the format it was opened with).
PROCESS_INFOS: VersionMemo[tuple[FileVersion, str | None], ImageInfo] = VersionMemo()
_FORMAT_HINT = (
    "use a raw or qcow2 image (vmdk, vdi, vhdx, vpc and qed are converted to qcow2), "
    "e.g. `qemu-img convert -O qcow2 IMAGE NEW.qcow2`"
)


def inspect_chain(
    qemu_img_path: Path,
    top: Path | HeldFile,
    allowed_dirs: AllowedDirs,
    field: str,
    limits: Limits = USER_IMAGE_LIMITS,
    holder: FileHolder | None = None,
    top_format: str | None = None,
) -> tuple[ImageInfo, ...]:
    """ImageInfo for ``top`` and each backing file below it, each checked before it is opened
    (into ``holder``: ``held`` of each level is its descriptor).

    Only ``top`` has its format probed, unless ``top_format`` says it (a file a guest could
    have written, such as a raw pool volume, must never be probed: its first bytes could
    claim a qcow2 header naming another file); every backing file is opened with the format
    its parent records (``-f``), so nothing below the top is ever guessed. A path ``top`` is
    opened here (relative: from the current directory). Without a ``holder`` the descriptors
    are closed before this returns.
    """
    if holder is None:
        with FileHolder() as own:
            return inspect_chain(qemu_img_path, top, allowed_dirs, field, limits, own, top_format)
    if not isinstance(top, HeldFile):
        top = open_allowed(
            field,
            Path(os.path.abspath(top)),
            allowed_dirs,
            holder,
            subject=str(top),
            advice="add its directory to the plugin's image_paths",
        )
    levels: list[ImageInfo] = []
    seen = {(top.fstat().st_dev, top.fstat().st_ino)}
    held, fmt = top, top_format
    while True:
        level = _info_of_user_file(qemu_img_path, held, fmt, field, levels, limits)
        check_level(level, allowed_dirs, field)
        levels.append(level)
        backing = backing_of(level, allowed_dirs, field, holder)
        if backing is None:
            return tuple(levels)
        held, fmt = backing
        st = held.fstat()
        if (st.st_dev, st.st_ino) in seen:
            raise ImageError(field, f"{top.path}: its backing chain loops back to {held.path}")
        if len(levels) >= MAX_CHAIN_LENGTH:
            raise ImageError(
                field,
                f"{top.path}: its backing chain is longer than {MAX_CHAIN_LENGTH} files; "
                "flatten it with `qemu-img convert -O qcow2`",
            )
        seen.add((st.st_dev, st.st_ino))


def check_level(level: ImageInfo, allowed_dirs: AllowedDirs, field: str) -> None:
    """One file of the chain: a format we take, not encrypted, no files outside allowed_dirs."""
    name = level.path
    if level.encrypted or level.format == "luks":
        raise ImageError(
            field,
            f"{name} is encrypted ({level.format}) and nomad-vm cannot supply its key; "
            "decrypt it with `qemu-img convert --object secret,... -O qcow2` first",
        )
    if level.format not in SHARED_FORMATS | CONVERTED_FORMATS:
        raise ImageError(field, f"{name}: qemu-img reads it as {level.format!r}; {_FORMAT_HINT}")
    if level.data_file is not None:
        raise ImageError(
            field,
            f"{name} keeps its data in an external file ({level.data_file}), which is not "
            "supported; make a self-contained copy with `qemu-img convert -O qcow2`",
        )
    for extent in level.extent_files:
        where = f"{name} reads extent file {extent}"
        if level.held is None:
            # Read by name (not through a descriptor): the extents are where qemu-img said.
            with FileHolder() as checked:
                _allowed(field, extent, allowed_dirs, name.parent, where, checked)
        elif extent != level.held.proc_path:
            # Another file, which QEMU would open by name at every read of the chain.
            raise ImageError(field, f"{where}; {_SEPARATE_EXTENTS}")


def backing_of(
    level: ImageInfo, allowed_dirs: AllowedDirs, field: str, holder: FileHolder
) -> tuple[HeldFile, str] | None:
    """The descriptor (opened into ``holder``) and recorded format of ``level``'s backing file,
    or None.

    Refuses what QEMU would open as anything but a plain file inside ``allowed_dirs`` (a
    protocol such as ``nbd://``, a ``json:`` filename, a path or symlink leading out), and a
    backing file whose format is not recorded (QEMU would probe it).
    """
    name = level.backing_filename or (level.backing_chain[0] if level.backing_chain else "")
    if not name:
        return None
    what = f"{level.path} has backing file {name}"
    # QEMU reads a protocol prefix (``nbd:``, ``json:``) in a name whose first ':' comes
    # before any '/'; anything else is a file, relative to the image's own directory.
    if ":" in name.split("/", 1)[0]:
        raise ImageError(field, f"{what}, which is not a plain file path; only files are allowed")
    fmt = level.backing_format
    if fmt is None:
        raise ImageError(
            field,
            f"{what} but does not record its format; record it with "
            f"`qemu-img rebase -u -b {name} -F FORMAT {level.path}` or flatten the image "
            "with `qemu-img convert -O qcow2`",
        )
    if fmt not in SHARED_FORMATS | CONVERTED_FORMATS:
        raise ImageError(field, f"{what} in format {fmt!r}; {_FORMAT_HINT}")
    return _allowed(field, name, allowed_dirs, level.path.parent, what, holder), fmt


def _allowed(
    field: str,
    name: str,
    allowed_dirs: AllowedDirs,
    base: Path,
    context: str,
    holder: FileHolder,
) -> HeldFile:
    """A file an image refers to, opened into ``holder`` if it is a regular file inside
    ``allowed_dirs``. The advice differs from the task options': widening image_paths is the
    wrong fix for an image that points elsewhere."""
    candidate = Path(name) if os.path.isabs(name) else base / name
    return open_allowed(
        field,
        candidate,
        allowed_dirs,
        holder,
        subject=context,
        advice="an image may only refer to files inside them",
    )


def held_of(level: ImageInfo) -> HeldFile:
    if level.held is None:
        raise ValueError(f"{level.path} was not read through a descriptor")
    return level.held


def _info_of_user_file(
    qemu_img_path: Path,
    held: HeldFile,
    fmt: str | None,
    field: str,
    levels: Sequence[ImageInfo],
    limits: Limits = USER_IMAGE_LIMITS,
) -> ImageInfo:
    """``info`` on a user-supplied file: qemu-img refusing it is the user's problem. What
    qemu-img said is remembered per file version (its refusals are not)."""
    path = held.path
    version = FileVersion.of_held(held)
    # Writing a block device (a Nomad volume's) changes nothing its stat shows: never
    # remembered, or a guest's new first bytes would go unseen.
    remember = not stat.S_ISBLK(held.fstat().st_mode)
    known = PROCESS_INFOS.get((version, fmt)) if remember else None
    if known is not None:
        return replace(known, path=path, held=held)
    try:
        info = qemu_img.info(qemu_img_path, held, fmt=fmt, follow_backing=False, limits=limits)
    except QemuImgLimitExceeded as exc:
        where = f"backing file {path} of {levels[-1].path}" if levels else str(path)
        raise ImageError(field, exc.explain(f"to read {where}")) from None
    except QemuImgError as exc:
        where = f"backing file {path} of {levels[-1].path}" if levels else str(path)
        if _SEPARATE_EXTENT.search(exc.stderr):
            raise ImageError(field, f"{where} names extent files; {_SEPARATE_EXTENTS}") from None
        raise ImageError(
            field, f"qemu-img cannot open {where} as a disk image: {exc.stderr}; {_FORMAT_HINT}"
        ) from None
    # Remembered only if the file did not change while qemu-img read it.
    if remember and FileVersion.of_held(held) == version:
        PROCESS_INFOS.put((version, fmt), info)
    return info

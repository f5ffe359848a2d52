"""The task's boot disk, made from the user's ``image`` without ever writing the image.

* ``use_thin_copy``: ``disk.qcow2`` is a qcow2 overlay backed by the image, shared read-only.
* otherwise: ``disk.qcow2`` is a sparse qcow2 copy of the image, independent of it.
* ``primary_disk_size`` (MB = MiB) grows the task's disk, never the image; shrinking is refused.

Formats. raw and qcow2 images (and chains made only of them) are used as they are. vmdk, vdi,
vhdx, vpc and qed are always converted to a private qcow2 copy, even with thin copy: QEMU keeps
those drivers for importing, several are read-only or slow, and a vmdk descriptor can name extent
files anywhere that QEMU would reopen at every VM start; one conversion checked here is simpler
to trust. Anything else (luks, encrypted qcow2, dmg, ...) is refused with what to do instead.

Security. An image can name other host files: a backing file (``/etc/shadow`` as a raw backing
file lets the guest read it), a qcow2 external data file, vmdk extents. The chain is walked one
level at a time with ``qemu-img info`` *without* ``--backing-chain`` (which would open each
backing file, an ``nbd://`` URL or a blocking FIFO included, before we can look at it), and
every named file must resolve inside ``allowed_dirs`` and have a recorded format before it is
opened. Residual risk: qemu-img opens vmdk extents and qcow2 data files (read-only) while
answering ``info``, before they are checked; the timeout bounds a FIFO there.

Integrity. Once the chain is allowed, each qcow2 file in it must pass ``qemu-img check``
(``nomad_vm.storage.integrity``): QEMU would boot a truncated qcow2 as if it were whole.

Resources. Every qemu-img run on the image's files (info, check, the overlay's create, convert)
runs under ``limits`` (``limits.USER_IMAGE_LIMITS``: address space and CPU time, the CPU time
of a conversion in proportion to the chain's allocated data); an image that makes qemu-img
exceed them is refused naming ``field`` (see ``qemu_img`` for the crafted image that does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError, ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.file_versions import FileVersion, VersionMemo
from nomad_vm.storage.integrity import PROCESS_VERDICTS, IntactImages, check_chain
from nomad_vm.storage.limits import USER_IMAGE_LIMITS, Limits
from nomad_vm.storage.paths import AllowedDirs, resolve_allowed_file, resolve_within
from nomad_vm.storage.qemu_img import ImageInfo, QemuImgLimitExceeded

MIB = 1024 * 1024
DISK_NAME = "disk.qcow2"
DISK_FORMAT = "qcow2"
IMAGE_FIELD = "config.image"
SIZE_FIELD = "config.primary_disk_size"
# Used in place (thin) and read directly (copy).
SHARED_FORMATS = frozenset({"raw", "qcow2"})
# Readable by qemu-img, but only ever converted into a private qcow2.
CONVERTED_FORMATS = frozenset({"vmdk", "vdi", "vhdx", "vpc", "qed"})
# A real chain is a handful of files; a longer one is a loop qemu-img did not see or an attack.
MAX_CHAIN_LENGTH = 16
# 64 TiB. A qcow2 of 1 PiB costs 16 MB of metadata before the guest writes anything.
MAX_DISK_MB = 64 * 1024 * 1024
# What qemu-img info said about each user file version (and the format it was opened with).
PROCESS_INFOS: VersionMemo[tuple[FileVersion, str | None], ImageInfo] = VersionMemo()
# Fresh overlays by (base file version, base format, size): a few hundred KB each.
OVERLAY_TEMPLATES: VersionMemo[tuple[FileVersion | None, str, int | None], bytes] = VersionMemo(
    limit=32
)
# Larger ones (huge virtual sizes have large L1 tables) are left to qemu-img each time.
MAX_TEMPLATE_BYTES = 4 * MIB
_FORMAT_HINT = (
    "use a raw or qcow2 image (vmdk, vdi, vhdx, vpc and qed are converted to qcow2), "
    "e.g. `qemu-img convert -O qcow2 IMAGE NEW.qcow2`"
)


@dataclass(frozen=True)
class PreparedDisk:
    """The task's disk. ``created`` lists the files this call made, for the caller's undo.

    ``thin`` is True when ``path`` is an overlay sharing the image (False for a copy, including
    a thin copy request on a converted format); ``source_format`` is the image's format.
    """

    path: Path
    format: str
    virtual_size: int
    created: tuple[Path, ...]
    thin: bool
    source_format: str


def prepare_boot_disk(
    qemu_img_path: Path,
    image: Path,
    dest_dir: Path,
    *,
    thin: bool,
    size_mb: int | None,
    allowed_dirs: AllowedDirs,
    field: str = IMAGE_FIELD,
    size_field: str = SIZE_FIELD,
    verdicts: IntactImages = PROCESS_VERDICTS,
    limits: Limits = USER_IMAGE_LIMITS,
) -> PreparedDisk:
    """Make ``dest_dir/disk.qcow2`` from ``image`` (see the module docstring for the rules).

    ``image`` should be the absolute path the driver resolved (a relative one is taken from the
    current directory). ``dest_dir`` must exist; an existing ``disk.qcow2`` there is never
    overwritten (HypervisorError). Every qcow2 file of the chain must pass ``qemu-img check``
    (``verdicts`` remembers the files that did). qemu-img runs on the image's files under
    ``limits``. User problems raise ImageError naming ``field`` or ``size_field``; qemu-img
    failures on our own files raise HypervisorError. On any failure nothing this call created
    is left behind.
    """
    check_requested_size(size_mb, size_field)
    top_path = resolve_allowed_file(field, str(image), allowed_dirs, base=os.getcwd())
    chain = inspect_chain(qemu_img_path, top_path, allowed_dirs, field, limits)
    top = chain[0]
    if top.virtual_size <= 0:
        raise ImageError(field, f"{top.path} is empty (virtual size 0); it cannot be a VM disk")
    size_bytes = target_size(size_mb, top.virtual_size, size_field)
    # Before anything is made: a damaged qcow2 would otherwise boot as if whole.
    check_chain(qemu_img_path, chain, field, verdicts, limits)
    dest = dest_dir / DISK_NAME
    created: list[Path] = []
    shared = thin and can_share(chain)
    try:
        _reserve(dest)
        created.append(dest)
        if shared:
            # An overlay is exactly the size asked for, or the base's: no need to ask qemu-img
            # again (each qemu-img run is tens of ms on the start path).
            _make_overlay(qemu_img_path, top, dest, size_bytes, limits)
            virtual_size = size_bytes or top.virtual_size
        else:
            data = sum(level.actual_size for level in chain)
            qemu_img.convert(
                qemu_img_path,
                top.path,
                top.format,
                dest,
                DISK_FORMAT,
                limits=limits.for_conversion(data),
            )
            if size_bytes is not None:
                qemu_img.resize(qemu_img_path, dest, DISK_FORMAT, size_bytes)
            # Our own file, made from the image, flat: no backing file to open.
            made = qemu_img.info(
                qemu_img_path, dest, fmt=DISK_FORMAT, follow_backing=False, limits=None
            )
            virtual_size = made.virtual_size
    except QemuImgLimitExceeded as exc:
        _remove(created)
        action = "to open" if shared else "to convert"
        raise ImageError(field, exc.explain(f"{action} {top.path}")) from None
    except BaseException:
        _remove(created)
        raise
    return PreparedDisk(dest, DISK_FORMAT, virtual_size, tuple(created), shared, top.format)


def inspect_chain(
    qemu_img_path: Path,
    top: Path,
    allowed_dirs: AllowedDirs,
    field: str,
    limits: Limits = USER_IMAGE_LIMITS,
) -> tuple[ImageInfo, ...]:
    """ImageInfo for ``top`` and each backing file below it, each checked before it is opened.

    Only ``top`` has its format probed; every backing file is opened with the format its parent
    records (``-f``), so nothing below the top is ever guessed.
    """
    levels: list[ImageInfo] = []
    seen = {top}
    path, fmt = top, None
    while True:
        level = _info_of_user_file(qemu_img_path, path, fmt, field, levels, limits)
        check_level(level, allowed_dirs, field)
        levels.append(level)
        backing = backing_of(level, allowed_dirs, field)
        if backing is None:
            return tuple(levels)
        path, fmt = backing
        if path in seen:
            raise ImageError(field, f"{top}: its backing chain loops back to {path}")
        if len(levels) >= MAX_CHAIN_LENGTH:
            raise ImageError(
                field,
                f"{top}: its backing chain is longer than {MAX_CHAIN_LENGTH} files; "
                "flatten it with `qemu-img convert -O qcow2`",
            )
        seen.add(path)


def check_requested_size(size_mb: int | None, size_field: str = SIZE_FIELD) -> None:
    """``primary_disk_size`` on its own: positive and within MAX_DISK_MB."""
    if size_mb is None:
        return
    if size_mb <= 0:
        raise ImageError(size_field, f"{size_mb} MB: must be a positive number of MB")
    if size_mb > MAX_DISK_MB:
        raise ImageError(size_field, f"{size_mb} MB is larger than the maximum of {MAX_DISK_MB} MB")


def target_size(size_mb: int | None, virtual_size: int, size_field: str = SIZE_FIELD) -> int | None:
    """The task disk's size in bytes when it must grow; None to keep the image's size.

    Refuses a size below the image's virtual size, naming both in MB (the image's rounded up, so
    the number shown is the smallest value that would be accepted).
    """
    if size_mb is None:
        return None
    wanted = size_mb * MIB
    if wanted < virtual_size:
        have_mb = -(-virtual_size // MIB)
        exact = "" if virtual_size % MIB == 0 else f" ({virtual_size} bytes)"
        raise ImageError(
            size_field,
            f"{size_mb} MB is smaller than the image's virtual size of {have_mb} MB{exact}; "
            "disks can only grow",
        )
    return wanted if wanted > virtual_size else None


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
        _allowed(field, extent, allowed_dirs, name.parent, f"{name} reads extent file {extent}")


def backing_of(level: ImageInfo, allowed_dirs: AllowedDirs, field: str) -> tuple[Path, str] | None:
    """The resolved path and recorded format of ``level``'s backing file, or None.

    Refuses what QEMU would open as anything but a plain file inside ``allowed_dirs`` (a
    protocol such as ``nbd://``, a ``json:`` filename, a path or symlink leading out), and a
    backing file whose format is not recorded (QEMU would probe it).
    """
    if not level.backing_chain:
        return None
    name = level.backing_chain[0]
    what = f"{level.path} has backing file {name}"
    # An absolute name has no protocol prefix for QEMU: its first '/' comes before any ':'.
    if not name.startswith("/"):
        raise ImageError(field, f"{what}, which is not a plain file path; only files are allowed")
    resolved = _allowed(field, name, allowed_dirs, level.path.parent, what)
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
    return resolved, fmt


def can_share(chain: Sequence[ImageInfo]) -> bool:
    """May the task's overlay be backed by this chain as it is (every file raw or qcow2)?"""
    return all(level.format in SHARED_FORMATS for level in chain)


def _allowed(field: str, name: str, allowed_dirs: AllowedDirs, base: Path, context: str) -> Path:
    """The resolved path of a file an image refers to, if it is a regular file inside
    ``allowed_dirs``. The advice differs from the task options': widening image_paths is the
    wrong fix for an image that points elsewhere."""
    candidate = Path(name) if os.path.isabs(name) else base / name
    return resolve_within(
        field,
        candidate,
        allowed_dirs,
        subject=context,
        advice="an image may only refer to files inside them",
    )


def _info_of_user_file(
    qemu_img_path: Path,
    path: Path,
    fmt: str | None,
    field: str,
    levels: Sequence[ImageInfo],
    limits: Limits = USER_IMAGE_LIMITS,
) -> ImageInfo:
    """``info`` on a user-supplied file: qemu-img refusing it is the user's problem. What
    qemu-img said is remembered per file version (its refusals are not)."""
    version = FileVersion.of(path)
    known = PROCESS_INFOS.get((version, fmt)) if version is not None else None
    if known is not None:
        return known
    try:
        info = qemu_img.info(qemu_img_path, path, fmt=fmt, follow_backing=False, limits=limits)
    except QemuImgLimitExceeded as exc:
        where = f"backing file {path} of {levels[-1].path}" if levels else str(path)
        raise ImageError(field, exc.explain(f"to read {where}")) from None
    except qemu_img.QemuImgError as exc:
        where = f"backing file {path} of {levels[-1].path}" if levels else str(path)
        raise ImageError(
            field, f"qemu-img cannot open {where} as a disk image: {exc.stderr}; {_FORMAT_HINT}"
        ) from None
    # Remembered only if the file did not change while qemu-img read it.
    if version is not None and FileVersion.of(path) == version:
        PROCESS_INFOS.put((version, fmt), info)
    return info


def _make_overlay(
    qemu_img_path: Path,
    top: ImageInfo,
    dest: Path,
    size_bytes: int | None,
    limits: Limits = USER_IMAGE_LIMITS,
) -> None:
    """``qemu-img create`` of an overlay on ``top``. A fresh overlay names only its backing
    file, format and size, so the same request gives the same bytes: the first is made by
    qemu-img and kept, later ones are copies of it (no qemu-img run on the start path)."""
    version = FileVersion.of(top.path)
    key = (version, top.format, size_bytes)
    template = OVERLAY_TEMPLATES.get(key) if version is not None else None
    if template is not None:
        with open(dest, "wb") as out:  # reserved (0600) by the caller
            out.write(template)
        return
    qemu_img.create_overlay(qemu_img_path, top.path, top.format, dest, size_bytes, limits=limits)
    if version is not None and FileVersion.of(top.path) == version:
        made = dest.read_bytes()
        if len(made) <= MAX_TEMPLATE_BYTES:
            OVERLAY_TEMPLATES.put(key, made)


def _reserve(dest: Path) -> None:
    """Claim ``dest`` atomically: qemu-img itself would silently overwrite an existing file."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise HypervisorError(
            f"{dest} already exists; refusing to overwrite a disk this task did not just create"
        ) from None
    except OSError as exc:
        raise HypervisorError(f"cannot create {dest}: {exc.strerror or exc}") from None
    os.close(fd)


def _remove(paths: Sequence[Path]) -> None:
    for path in reversed(paths):
        # The error being raised says more than a failed clean-up would.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

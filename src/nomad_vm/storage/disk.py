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
opened. Residual risk: qemu-img opens qcow2 external data files (read-only) while answering
``info``, before they are refused; the timeout bounds a FIFO there.

Descriptors. Every file of the chain is opened once (``nomad_vm.storage.held.open_allowed``:
checked on the descriptor, not the name) and only ever read through that descriptor: by qemu-img
(``/proc/self/fd/N``, the chain given explicitly in a ``json:`` filename) and by QEMU (the
``PreparedDisk.chain`` it is handed). The overlay records the base's path without opening it
(``qemu-img create -u``), and QEMU never opens that name. A relative backing name is taken
relative to the real directory of the file that records it. A vmdk whose descriptor keeps its
data in separate extent files cannot be read through one descriptor, and is refused with how
to make it one file.

Integrity. Once the chain is allowed, each qcow2 file in it must pass ``qemu-img check``
(``nomad_vm.storage.integrity``): QEMU would boot a truncated qcow2 as if it were whole.

Resources. Every qemu-img run on the image's files (info, check, the overlay's create, convert)
runs under ``limits`` (``limits.USER_IMAGE_LIMITS``: address space and CPU time, the CPU time
of a conversion in proportion to the chain's allocated data); an image that makes qemu-img
exceed them is refused naming ``field`` (see ``qemu_img_run`` for the crafted image that does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from nomad_vm.errors import HypervisorError, ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.chain import (
    SHARED_FORMATS,
    held_of,
    inspect_chain,
)
from nomad_vm.storage.file_versions import FileVersion, VersionMemo
from nomad_vm.storage.held import FileHolder, HeldFile
from nomad_vm.storage.integrity import PROCESS_VERDICTS, IntactImages, check_chain
from nomad_vm.storage.limits import USER_IMAGE_LIMITS, Limits
from nomad_vm.storage.paths import AllowedDirs
from nomad_vm.storage.qemu_img import ImageInfo
from nomad_vm.storage.qemu_img_run import QemuImgLimitExceeded

MIB = 1024 * 1024
DISK_NAME = "disk.qcow2"
DISK_FORMAT = "qcow2"
IMAGE_FIELD = "config.image"
SIZE_FIELD = "config.primary_disk_size"
# 64 TiB. A qcow2 of 1 PiB costs 16 MB of metadata before the guest writes anything.
MAX_DISK_MB = 64 * 1024 * 1024
# Fresh overlays by (base file version, base format, size): a few hundred KB each.
OVERLAY_TEMPLATES: VersionMemo[tuple[FileVersion, str, int], bytes] = VersionMemo(limit=32)
# Larger ones (huge virtual sizes have large L1 tables) are left to qemu-img each time.
MAX_TEMPLATE_BYTES = 4 * MIB


@dataclass(frozen=True)
class PreparedDisk:
    """The task's disk. ``created`` lists the files this call made, for the caller's undo.

    ``thin`` is True when ``path`` is an overlay sharing the image (False for a copy, including
    a thin copy request on a converted format); ``source_format`` is the image's format.
    ``chain`` is the overlay's backing chain (nearest first) as the descriptors and formats
    the VMM must be given (empty for a copy); they belong to the caller's ``FileHolder``.
    """

    path: Path
    format: str
    virtual_size: int
    created: tuple[Path, ...]
    thin: bool
    source_format: str
    chain: tuple[tuple[HeldFile, str], ...] = ()


def prepare_boot_disk(
    qemu_img_path: Path,
    image: Path | HeldFile,
    dest_dir: Path,
    *,
    thin: bool,
    size_mb: int | None,
    allowed_dirs: AllowedDirs,
    field: str = IMAGE_FIELD,
    size_field: str = SIZE_FIELD,
    verdicts: IntactImages = PROCESS_VERDICTS,
    limits: Limits = USER_IMAGE_LIMITS,
    holder: FileHolder | None = None,
    name: str = DISK_NAME,
    fmt: str = DISK_FORMAT,
    expected_format: str = "",
) -> PreparedDisk:
    """Make ``dest_dir/<name>`` (a ``fmt`` image) from ``image`` (see the module docstring for
    the rules); ``expected_format``: the image must be of that format (the task said so).

    ``image`` is the descriptor the driver opened (``held.open_allowed``), or a path, opened
    here (a relative one is taken from the current directory). The files of the chain are
    opened into ``holder``, which the caller closes once the VMM has them (without one they
    are closed before this returns, and ``chain`` is empty). ``dest_dir`` must exist; an
    existing ``disk.qcow2`` there is never overwritten (HypervisorError). Every qcow2 file of
    the chain must pass ``qemu-img check`` (``verdicts`` remembers the files that did).
    qemu-img runs on the image's files under ``limits``. User problems raise ImageError naming
    ``field`` or ``size_field``; qemu-img failures on our own files raise HypervisorError. On
    any failure nothing this call created is left behind.
    """
    check_requested_size(size_mb, size_field)
    if holder is None:
        with FileHolder() as own:
            made = prepare_boot_disk(
                qemu_img_path,
                image,
                dest_dir,
                thin=thin,
                size_mb=size_mb,
                allowed_dirs=allowed_dirs,
                field=field,
                size_field=size_field,
                verdicts=verdicts,
                limits=limits,
                holder=own,
                name=name,
                fmt=fmt,
                expected_format=expected_format,
            )
        return replace(made, chain=())
    # A format the task states is used, not probed (and so must be right).
    chain = inspect_chain(
        qemu_img_path, image, allowed_dirs, field, limits, holder, expected_format or None
    )
    top = chain[0]
    if expected_format and top.format != expected_format:
        raise ImageError(
            field, f"{top.path} is {top.format}, not {expected_format} as the task says"
        )
    if top.virtual_size <= 0:
        raise ImageError(field, f"{top.path} is empty (virtual size 0); it cannot be a VM disk")
    size_bytes = target_size(size_mb, top.virtual_size, size_field)
    # Before anything is made: a damaged qcow2 would otherwise boot as if whole.
    check_chain(qemu_img_path, chain, field, verdicts, limits)
    files = tuple((held_of(level), level.format) for level in chain)
    dest = dest_dir / name
    created: list[Path] = []
    shared = thin and can_share(chain) and fmt == DISK_FORMAT
    try:
        _reserve(dest)
        created.append(dest)
        if shared:
            # An overlay is exactly the size asked for, or the base's: no need to ask qemu-img
            # again (each qemu-img run is tens of ms on the start path).
            virtual_size = size_bytes or top.virtual_size
            _make_overlay(qemu_img_path, top, dest, virtual_size)
        else:
            data = sum(level.actual_size for level in chain)
            qemu_img.convert(
                qemu_img_path,
                files[0][0],
                top.format,
                dest,
                fmt,
                backing=files[1:],
                limits=limits.for_conversion(data),
            )
            if size_bytes is not None:
                qemu_img.resize(qemu_img_path, dest, fmt, size_bytes)
            # Our own file, made from the image, flat: no backing file to open.
            flat = qemu_img.info(qemu_img_path, dest, fmt=fmt, follow_backing=False, limits=None)
            virtual_size = flat.virtual_size
    except QemuImgLimitExceeded as exc:
        _remove(created)
        action = "to open" if shared else "to convert"
        raise ImageError(field, exc.explain(f"{action} {top.path}")) from None
    except BaseException:
        _remove(created)
        raise
    return PreparedDisk(
        dest, fmt, virtual_size, tuple(created), shared, top.format, files if shared else ()
    )


def make_empty_disk(
    qemu_img_path: Path, dest: Path, fmt: str, size_bytes: int, *, sparse: bool
) -> None:
    """A new, empty ``fmt`` disk at ``dest`` (never an existing file); ``sparse=False``
    reserves its space up front (``preallocation=falloc``). Nothing is left on failure."""
    _reserve(dest)
    try:
        qemu_img.create(qemu_img_path, dest, fmt, size_bytes, falloc=not sparse)
    except BaseException:
        _remove([dest])
        raise


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


def can_share(chain: Sequence[ImageInfo]) -> bool:
    """May the task's overlay be backed by this chain as it is (every file raw or qcow2)?"""
    return all(level.format in SHARED_FORMATS for level in chain)


def _make_overlay(qemu_img_path: Path, top: ImageInfo, dest: Path, size_bytes: int) -> None:
    """``qemu-img create -u`` of an overlay on ``top`` (which it does not open). A fresh
    overlay names only its backing file, format and size, so the same request gives the same
    bytes: the first is made by qemu-img and kept, later ones are copies of it (no qemu-img
    run on the start path)."""
    key = (FileVersion.of_held(held_of(top)), top.format, size_bytes)
    template = OVERLAY_TEMPLATES.get(key)
    if template is not None:
        with open(dest, "wb") as out:  # reserved (0600) by the caller
            out.write(template)
        return
    qemu_img.create_overlay(qemu_img_path, top.path, top.format, dest, size_bytes)
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

"""Files a VM uses, opened once by the plugin and handed on as descriptors.

A job names files (``image`` and its backing chain, ``kernel``, ``initramfs``, ``user_data``);
checking such a name and then letting qemu-img or QEMU open it again by name leaves a window
in which the path can be replaced (by a symlink to ``/etc/shadow``, or to another tenant's
disk) and the swap wins. So a file is opened here exactly once and everything after works on
that descriptor:

* ``open_allowed`` resolves the name (nothing opened) and refuses it at once if it leads out
  of the allowed directories; then opens the resolved path with ``O_PATH`` (no access to the
  file's data, no side effect on a FIFO or a device) below its allowed directory, following
  no symlink (``beneath``: a symlink swapped in meanwhile is refused), and checks *the
  descriptor*: where it really is (``readlink /proc/self/fd/N``: inside the allowlist, not in
  the plugin's state) and what it is (``fstat``: a regular file). Only then is the same inode
  reopened for reading, through ``/proc/self/fd/N`` (which names the inode, not the path).
* qemu-img reads ``/proc/self/fd/N`` (the descriptor is passed to it), QEMU gets block devices
  as ``-add-fd`` + ``/dev/fdset/S``, and a kernel or initramfs as ``/proc/self/fd/N`` (QEMU
  loads those with plain ``open``, which does not know fdsets).
* Reopening ``/proc/self/fd/N`` checks the inode's permissions against the opener, so a
  kernel that an unprivileged QEMU could not read itself is given to it as a sealed memfd copy
  (``readable_copy``): memfds are readable by anyone who holds them, and the seals make the
  copy immutable. Only files that need it are copied (a few ms per MB).
* The plugin's own files that QEMU uses (the task's disk, the seed ISO, the UEFI code and the
  task's variable store) are passed the same way (``open_own``), so QEMU needs no filesystem
  permission at all.

Every descriptor opened for one start is registered with a ``FileHolder`` and closed once the
VMM has been spawned (it holds its own copies) or the start failed: the plugin serves many
tasks and must not leak descriptors, nor let one task's VMM inherit another's (spawn uses
``close_fds``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import ImageError
from nomad_vm.storage.beneath import REFUSED_WALK, open_beneath
from nomad_vm.storage.paths import (
    AllowedDirs,
    Allowlist,
    as_allowlist,
    check_real_path,
    resolve_within,
)

# Copied into a memfd in chunks of this size (sendfile needs no user-space buffer).
_COPY_CHUNK = 1 << 24
# A sealed copy can no longer be written, resized or unsealed by anyone.
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


@dataclass(frozen=True)
class HeldFile:
    """An open descriptor (``fd``) of the file that was at ``path`` when it was opened.

    ``path`` is for messages and records only: nothing opens it again."""

    path: Path
    fd: int
    writable: bool = False

    @property
    def proc_path(self) -> str:
        """The name that reopens this very inode (in this process, or in a child that inherited
        the descriptor under the same number)."""
        return f"/proc/self/fd/{self.fd}"

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)


class FileHolder:
    """The descriptors one task start opened; ``close`` closes them all (idempotent)."""

    def __init__(self) -> None:
        self._files: list[HeldFile] = []

    def add(self, held: HeldFile) -> HeldFile:
        self._files.append(held)
        return held

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(f.fd for f in self._files)

    def close(self) -> None:
        files, self._files = self._files, []
        for held in files:
            with contextlib.suppress(OSError):
                os.close(held.fd)

    def __enter__(self) -> FileHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_allowed(
    field: str,
    candidate: Path,
    allowed_dirs: AllowedDirs,
    holder: FileHolder,
    *,
    subject: str,
    advice: str,
) -> HeldFile:
    """Open ``candidate`` read-only, if the file it leads to is a regular file inside
    ``allowed_dirs`` and not in their private parts, checked on the descriptor (see the module
    docstring). ``subject`` starts every error message, ``advice`` ends the "outside" one.
    The descriptor is registered with ``holder``."""
    # Where the name leads now (symlinks and ".." resolved, nothing opened), refused at once
    # if that is outside; then opened below its allowed directory through no symlink at all.
    resolved = resolve_within(
        field, candidate, allowed_dirs, subject=subject, advice=advice, regular=False
    )
    probe = _open_path(field, resolved, as_allowlist(allowed_dirs), subject)
    try:
        real = Path(os.readlink(f"/proc/self/fd/{probe}"))
        check_real_path(field, real, allowed_dirs, subject=subject, advice=advice)
        if not stat.S_ISREG(os.fstat(probe).st_mode):
            raise ImageError(field, f"{subject}: not a regular file")
        try:
            # The same inode (the magic link does not walk the path again), now readable.
            fd = os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise ImageError(
                field, f"{subject}: not readable by the plugin: {exc.strerror or exc}"
            ) from None
    finally:
        os.close(probe)
    return holder.add(HeldFile(real, fd))


def _open_path(field: str, resolved: Path, allowlist: Allowlist, subject: str) -> int:
    """An ``O_PATH`` descriptor of ``resolved``, opened below the allowed directory holding it
    without following any symlink (``beneath.open_beneath``): a component swapped for a
    symlink since it was resolved is refused, not followed."""
    roots = allowlist.root_paths()
    root = next((r for r in roots if r == resolved or r in resolved.parents), None)
    if root is None:  # an allowed directory itself moved since the path was checked
        raise ImageError(
            field, f"{subject}: {resolved} is no longer inside the allowed directories"
        )
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_beneath(root_fd, str(resolved.relative_to(root)), flags)
        finally:
            os.close(root_fd)
    except OSError as exc:
        if exc.errno in REFUSED_WALK:
            raise ImageError(
                field,
                f"{subject}: its path changed while it was being opened (a symlink appeared in "
                f"{resolved}); refused",
            ) from None
        if exc.errno == errno.ENOSYS:
            # A kernel before 5.6: the check on the descriptor below still decides.
            return _open_fallback(field, resolved, subject)
        if exc.errno == errno.ENOENT:
            raise ImageError(field, f"{subject}: no such file") from None
        raise ImageError(field, f"{subject}: cannot open {resolved}: {exc.strerror}") from None


def _open_fallback(field: str, resolved: Path, subject: str) -> int:
    try:
        return os.open(resolved, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ImageError(field, f"{subject}: cannot open {resolved}: {exc.strerror}") from None


def open_own(
    path: Path, holder: FileHolder, *, writable: bool, follow_symlinks: bool = False
) -> HeldFile:
    """A file the plugin made itself (in the task's runtime dir: never through a symlink) or
    a system file it trusts (the UEFI code: Debian installs some builds as symlinks, so
    ``follow_symlinks``), opened for QEMU. OSError if it cannot be opened."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    return holder.add(HeldFile(path, os.open(path, flags), writable))


def readable_by_anyone(held: HeldFile) -> bool:
    """Could any user reopen it through ``/proc/self/fd`` (world-readable)?"""
    return bool(held.fstat().st_mode & stat.S_IROTH)


def readable_copy(held: HeldFile, holder: FileHolder) -> HeldFile:
    """``held`` itself if anyone may read it, else a sealed memfd copy of it (see the module
    docstring). The copy is registered with ``holder``."""
    if readable_by_anyone(held):
        return held
    fd = os.memfd_create(held.path.name or "file", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    copy = holder.add(HeldFile(held.path, fd))
    size = held.fstat().st_size
    offset = 0
    while offset < size:
        sent = os.sendfile(fd, held.fd, offset, min(_COPY_CHUNK, size - offset))
        if sent == 0:
            break  # the file shrank meanwhile: the copy is what was there
        offset += sent
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return copy


def read_allowed_text(
    field: str, candidate: Path, allowed_dirs: AllowedDirs, *, subject: str, advice: str
) -> str:
    """The UTF-8 text of a file a job names, read from the one descriptor that was checked."""
    with FileHolder() as holder:
        held = open_allowed(field, candidate, allowed_dirs, holder, subject=subject, advice=advice)
        with os.fdopen(os.dup(held.fd), "rb") as f:
            data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageError(field, f"cannot read {held.path}: {exc}") from None

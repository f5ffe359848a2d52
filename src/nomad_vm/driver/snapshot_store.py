"""Where a task's snapshot lives, and its files: `<task dir>/local/.nomad-vm-snapshot/`.

Why `local/`: of Nomad's directories for a task, it is the one that is the task's own (not
shared with the allocation's other tasks, as `alloc/` is), survives a restart of the task in
its allocation (as the whole task directory does), and is also what Nomad carries to the next
allocation with `ephemeral_disk { sticky = true }` (moved on the same node) or `migrate =
true` (copied from the previous node): it moves `alloc/data` and each task's `local/`, nothing
else of the task directory. The TPM's state sits in the task directory itself
(``tpm_state``), and so does not migrate.

`local/` is writable by whoever owns the task's other files and may be shared read-only with
the guest (`share_task_dirs`), so the directory is made by the plugin (root) through no
symlink, 0700 root; the files in it are 0600 root. QEMU never opens them: it gets descriptors
(``vm.qemu.snapshot``). A snapshot is written to `.nomad-vm-snapshot.new` and renamed into place
when complete, so a plugin that dies while saving leaves nothing that looks usable.

Its files: ``state`` (QEMU's migration stream: the guest's RAM and device state),
``record.json`` (the machine it belongs to, ``snapshots``), and the files of the task's
runtime directory that hold the rest of the machine's state (its disk overlays, the UEFI
variable store) under their own names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError

SNAPSHOT_DIR = ".nomad-vm-snapshot"
PARTIAL_DIR = ".nomad-vm-snapshot.new"
STATE_FILE = "state"
RECORD_FILE = "record.json"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Restore:
    """A snapshot that matches the task: what the start resumes (``snapshots.find_restore``)."""

    dir_fd: int
    files: tuple[str, ...]
    saved_at: float
    state_bytes: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)



def local_dir(task_dir: Path) -> Path:
    return task_dir / "local"


def snapshot_dir(task_dir: Path) -> Path:
    return local_dir(task_dir) / SNAPSHOT_DIR


def open_dir(path: Path) -> int:
    """``path`` (a directory, not a symlink) as a descriptor; OSError when it is not one."""
    return os.open(path, DIR_FLAGS)


def _check_ours(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HypervisorError(
            f"{path} is not a directory of the plugin's user (uid {st.st_uid}): refusing to "
            "use it for a snapshot (remove it)"
        )


def open_snapshot(task_dir: Path) -> int | None:
    """The task's complete snapshot directory as a descriptor; None when there is none.
    One that is not the plugin's own directory is refused (HypervisorError)."""
    path = snapshot_dir(task_dir)
    try:
        fd = open_dir(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HypervisorError(f"cannot open the snapshot {path}: {exc}") from exc
    try:
        _check_ours(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def begin_snapshot(task_dir: Path) -> int:
    """A fresh, empty `.nomad-vm-snapshot.new` (0700) as a descriptor: what an earlier save
    left half done is removed first."""
    local = local_dir(task_dir)
    try:
        parent = open_dir(local)
    except OSError as exc:
        raise HypervisorError(f"cannot open the task's local directory {local}: {exc}") from exc
    try:
        _remove_entry(parent, PARTIAL_DIR)
        old_umask = os.umask(0o077)
        try:
            os.mkdir(PARTIAL_DIR, 0o700, dir_fd=parent)
        finally:
            os.umask(old_umask)
        fd = os.open(PARTIAL_DIR, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise HypervisorError(f"cannot make a snapshot directory in {local}: {exc}") from exc
    finally:
        os.close(parent)
    return fd


def commit_snapshot(task_dir: Path) -> None:
    """The saved snapshot replaces the task's previous one (if any)."""
    local = local_dir(task_dir)
    parent = open_dir(local)
    try:
        _remove_entry(parent, SNAPSHOT_DIR)
        os.rename(PARTIAL_DIR, SNAPSHOT_DIR, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
    finally:
        os.close(parent)


def remove_snapshot(task_dir: Path) -> bool:
    """Remove the task's snapshot and any half-saved one; True when there was one."""
    try:
        parent = open_dir(local_dir(task_dir))
    except OSError:
        return False
    try:
        _remove_entry(parent, PARTIAL_DIR)
        return _remove_entry(parent, SNAPSHOT_DIR)
    finally:
        os.close(parent)


def remove_partial(task_dir: Path) -> None:
    """Remove a half-saved snapshot (the complete one stays)."""
    parent = open_dir(local_dir(task_dir))
    try:
        _remove_entry(parent, PARTIAL_DIR)
    finally:
        os.close(parent)


def _remove_entry(parent: int, name: str) -> bool:
    """Remove ``name`` under the directory ``parent``, a tree or a single entry, never
    following a symlink out of it."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)
    return True


def create_file(dir_fd: int, name: str) -> int:
    """A new file ``name`` (0600, writable) in the directory ``dir_fd``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def make_private(dir_fd: int, name: str) -> None:
    """``name`` in ``dir_fd`` readable by its owner only (a disk holds the guest's data)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def open_file(dir_fd: int, name: str) -> int:
    """The file ``name`` in the directory ``dir_fd``, for reading (a regular file only)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HypervisorError(f"the snapshot's {name} is not a regular file")
    return fd


def move_file(src_dir: int, dst_dir: int, name: str, *, keep: bool = False) -> None:
    """``name`` from one directory to the other (replacing a file there): a rename on one
    filesystem, else a copy (the runtime dir can be under the plugin's data_dir). With
    ``keep`` the source stays (a copy always)."""
    if not keep:
        try:
            os.rename(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dst_dir)
        target = create_file(dst_dir, name)
        try:
            _copy_sparse(source, target)
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(source)
    if not keep:
        os.unlink(name, dir_fd=src_dir)


def _copy_sparse(source: int, target: int) -> None:
    """Copy keeping holes (a thin qcow2 overlay or a sparse raw disk stays small)."""
    size = os.fstat(source).st_size
    offset = 0
    while offset < size:
        try:
            data = os.lseek(source, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(source, data, os.SEEK_HOLE)
        position = data
        while position < hole:
            copied = os.copy_file_range(source, target, hole - position, position, position)
            if copied == 0:
                break
            position += copied
        offset = hole
    os.ftruncate(target, size)


def put_back(restore: Restore, runtime_dir: Path, name: str) -> bool:
    """The snapshot's copy of ``name`` replaces the one the start just made in the runtime
    directory; False when the snapshot has none."""
    if name not in restore.files:
        return False
    target = open_dir(runtime_dir)
    try:
        move_file(restore.dir_fd, target, name)
    finally:
        os.close(target)
    return True

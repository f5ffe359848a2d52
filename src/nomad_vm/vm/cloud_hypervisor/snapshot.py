"""A Cloud Hypervisor VM's memory and device state to one file and back.

CH saves a paused VM into a directory it opens by name (``vm.snapshot`` with ``file://DIR``):
``config.json`` (the VM's definition), ``state.json`` (every device's state, keyed by device
id) and ``memory-ranges`` (guest RAM); ``vm.restore`` into a VMM that has no VM yet brings it
back, paused. Its pause drains every disk's requests and writes qcow2 metadata out, so the
disk files the driver keeps with the state are consistent with it. The driver keeps a
snapshot as one state file it reaches through a descriptor (``driver/snapshot_store``, sealed
by ``snapshot_seal``), so the directory is only a way station, inside CH's working directory
(``vmm_files``: vm_user's, the only place CH, running as vm_user, can name):

* saving: the plugin makes an empty directory there and hands it to vm_user; CH writes into
  it; the plugin packs the three files into the state file as an uncompressed tar (each opened
  without following links and checked to be a regular file: CH may not plant a link to
  something of root's), and removes the directory;
* restoring: before CH starts, the plugin unpacks the state file into a fresh directory there
  (only ``state.json`` and ``memory-ranges``, regular files, each created anew). Its
  ``config.json`` is not the saved one but the definition this start built (``vm_config``):
  the saved one names the files by the descriptors of the CH that saved it
  (``/proc/self/fd/N``), and the TAP and sockets of that start. The machine is the same (the
  snapshot's record matched) and the devices keep their ids (disk0, seed, net0, fs0, vsock0),
  which is how CH finds each device's state. Once CH has restored the VM (it copies guest
  memory in) and resumed it, the directory is removed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO, BinaryIO

from nomad_vm.errors import HypervisorError

SAVE_DIR = "snapshot"
RESTORE_DIR = "restore"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
MEMORY_FILE = "memory-ranges"
SAVED_FILES = (CONFIG_FILE, STATE_FILE, MEMORY_FILE)
# What a restore takes from the state file (config.json is this start's own).
RESTORED_FILES = (STATE_FILE, MEMORY_FILE)
# Loading all of guest memory from a local file.
RESTORE_TIMEOUT = 300.0
COPY_CHUNK = 1 << 20


def url(name: str) -> str:
    """How CH is told a directory of its working directory: relative (``url_to_path`` keeps
    what follows ``file://``), since vm_user can reach no ancestor of it by path."""
    return f"file://{name}"


def fresh_dir(vmm_dir: Path, name: str) -> Path:
    """An empty directory ``name`` in CH's working directory, owned like it (vm_user's)."""
    path = vmm_dir / name
    remove_dir(path)
    path.mkdir(mode=0o700)
    owner = os.stat(vmm_dir)
    os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    return path


def remove_dir(path: Path) -> None:
    """Gone, whatever CH left in it or put in its place: a link is removed, never followed
    (rmtree works through descriptors below the top)."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            os.unlink(path)
            return
        shutil.rmtree(path)
    except FileNotFoundError:
        return


def pack(directory: Path, fd: int) -> int:
    """The snapshot CH wrote in ``directory`` as a tar on ``fd``; the bytes of guest memory.
    HypervisorError when a file is missing or not a regular file."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    memory = 0
    try:
        with (
            os.fdopen(os.dup(fd), "wb") as out,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in SAVED_FILES:
                with _open_member(dir_fd, name) as member:
                    size = os.fstat(member.fileno()).st_size
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = size, 0o600
                    tar.addfile(info, member)
                if name == MEMORY_FILE:
                    memory = size
    except (OSError, tarfile.TarError) as exc:
        raise HypervisorError(f"cannot keep Cloud Hypervisor's snapshot: {exc}") from exc
    finally:
        os.close(dir_fd)
    return memory


def _open_member(dir_fd: int, name: str) -> BinaryIO:
    """A file CH wrote, read as root: never through a link, only a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise HypervisorError(f"Cloud Hypervisor's snapshot has no {name}") from None
    except OSError as exc:
        raise HypervisorError(f"Cloud Hypervisor's snapshot {name}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HypervisorError(f"Cloud Hypervisor's snapshot {name} is not a regular file")
    return os.fdopen(fd, "rb")


def _write_new(dir_fd: int, name: str, data: IO[bytes] | bytes, owner: os.stat_result) -> None:
    """A new file ``name`` (never an existing one or a link), 0600, given to ``owner``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            shutil.copyfileobj(data, out, COPY_CHUNK)
        os.fchown(out.fileno(), owner.st_uid, owner.st_gid)


def unpack(fd: int, directory: Path, config: bytes) -> None:
    """The saved state from the state file ``fd`` into ``directory`` (an empty one, made by
    ``fresh_dir``), with ``config`` (this start's VM definition) as its config.json.
    HypervisorError when the state file is not a snapshot this module packed."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(dir_fd)
        os.lseek(fd, 0, os.SEEK_SET)
        seen: set[str] = set()
        with os.fdopen(os.dup(fd), "rb") as source, tarfile.open(fileobj=source, mode="r|") as tar:
            for member in tar:
                if member.name == CONFIG_FILE:
                    continue
                if member.name not in RESTORED_FILES or member.name in seen:
                    raise HypervisorError(f"unexpected {member.name!r} in the snapshot")
                if not member.isreg():
                    raise HypervisorError(f"{member.name!r} in the snapshot is not a file")
                data = tar.extractfile(member)
                if data is None:
                    raise HypervisorError(f"{member.name!r} in the snapshot has no data")
                _write_new(dir_fd, member.name, data, owner)
                seen.add(member.name)
        missing = sorted(set(RESTORED_FILES) - seen)
        if missing:
            raise HypervisorError(f"the snapshot lacks {', '.join(missing)}")
        _write_new(dir_fd, CONFIG_FILE, config, owner)
    except (OSError, tarfile.TarError) as exc:
        raise HypervisorError(f"cannot unpack the Cloud Hypervisor snapshot: {exc}") from exc
    finally:
        os.close(dir_fd)

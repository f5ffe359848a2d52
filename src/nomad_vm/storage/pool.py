"""Directory storage pools (nomad-driver-virt's `storage_pools { directory "x" { path } }`):
a host directory of the plugin's holding named volumes that outlive tasks.

* A volume is one file directly in the pool's directory, named by the job (``disk_request``
  checks the name: one path component, never hidden). Every open goes through
  ``held.open_allowed`` with the pool as the only allowed directory, so a symlink planted in
  the pool cannot lead out of it, and a volume's backing chain must stay inside it.
* A volume appears whole or not at all: it is made under a hidden temporary name (recorded in
  the task's journal, so a failed start's replay removes it) and published with ``link(2)``,
  which never replaces a volume another task made meanwhile.
* A source image written into the pool is named after the image and its version
  (``image_volume_name``), so the next task with the same, unchanged source reuses it.
* The directory must be the plugin's: created 0700 when missing, refused when it is a
  symlink, not a directory, owned by someone else or writable by group or others (anyone
  who can write it could swap a volume under a task).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.storage.file_versions import FileVersion
from nomad_vm.storage.held import HeldFile
from nomad_vm.storage.paths import Allowlist

TEMP_PREFIX = ".nomad-vm-"


def pool_allowlist(pool_dir: Path) -> Allowlist:
    """Files of a pool volume's chain may come from the pool only."""
    return Allowlist(roots=(str(pool_dir),))


def ensure_pool(pool_dir: Path) -> None:
    """The pool's directory exists and is the plugin's alone (see the module docstring)."""
    try:
        os.makedirs(pool_dir, mode=0o700, exist_ok=True)
        st = os.lstat(pool_dir)
    except OSError as exc:
        raise HypervisorError(
            f"storage pool directory {pool_dir}: {exc.strerror or exc}; fix the path in the "
            "plugin's storage_pools"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise HypervisorError(f"storage pool directory {pool_dir} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise HypervisorError(
            f"storage pool directory {pool_dir} must belong to the plugin's user (uid "
            f"{os.geteuid()}) and not be writable by group or others (chmod 0700)"
        )


def temp_path(pool_dir: Path, task_id: str, index: int, what: str) -> Path:
    """A hidden name for a volume being made by this task's disk ``index``."""
    tag = re.sub(r"[^A-Za-z0-9_-]", "_", task_id)[-64:]
    return pool_dir / f"{TEMP_PREFIX}{tag}-{index}-{what}.part"


def publish(temp: Path, final: Path) -> bool:
    """Give the finished ``temp`` its name ``final``; False when a volume of that name
    appeared meanwhile (ours is then dropped, theirs is kept)."""
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    return True


def image_volume_name(image: HeldFile) -> str:
    """The pool volume an image is written into: its name, and a hash of where it is and
    which version of it (device, inode, size, times): a changed image gets a new volume."""
    version = FileVersion.of_held(image)
    key = f"{image.path}|{version.device}|{version.inode}|{version.size}|{version.mtime_ns}"
    key += f"|{version.ctime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", image.path.stem).lstrip(".") or "image"
    return f"{stem[:64]}-{digest}.qcow2"

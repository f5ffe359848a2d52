"""Snapshots the plugin itself wrote, and only those, are resumed.

A snapshot lives in the task's `local/` directory, where a job can also put files (a
`template` or `artifact` block writes there as root). A planted one would hand QEMU a state
stream of the job author's making, or a disk overlay whose backing file names another task's
disk. So the save records a SHA-256 of every file it wrote and seals the record with an HMAC
under the node's key, ``<data_dir>/snapshot.key`` (32 random bytes, 0600, made at first use);
the resume checks the seal and every file's digest before anything is opened for QEMU. A
snapshot moved to another node (`ephemeral_disk { migrate }`) is resumed there only when that
node's plugin has the same key file; elsewhere it is refused and the VM boots.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from nomad_vm.driver import snapshot_store as store
from nomad_vm.errors import HypervisorError

KEY_FILE = "snapshot.key"
KEY_BYTES = 32
CHUNK = 1 << 20


def node_key(data_dir: Path) -> bytes:
    """The node's snapshot key, made (0600, the plugin's user only) when there is none;
    HypervisorError when the file is not fit to be one."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise HypervisorError(f"{path} must be the plugin user's own, mode 0600")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise HypervisorError(
            f"{path} must hold {KEY_BYTES} bytes (remove it to make a new one)"
        )
    return key


def file_digest(dir_fd: int, name: str) -> str:
    fd = store.open_file(dir_fd, name)
    digest = hashlib.sha256()
    try:
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _mac(record: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def seal(record: dict[str, Any], dir_fd: int, names: list[str], key: bytes) -> dict[str, Any]:
    """``record`` with the digests of ``names`` (files in the snapshot) and its seal."""
    sealed = {**record, "digests": {name: file_digest(dir_fd, name) for name in names}}
    return {**sealed, "seal": _mac(sealed, key)}


def check(record: dict[str, Any], dir_fd: int, key: bytes) -> None:
    """ValueError unless this node's plugin sealed ``record`` and every file is as saved."""
    if not hmac.compare_digest(str(record.get("seal", "")), _mac(record, key)):
        raise ValueError(
            "it was not written by this node's plugin (its seal does not match the node's "
            "snapshot key)"
        )
    digests = record.get("digests")
    if not isinstance(digests, dict):
        raise ValueError("it names no file digests")
    for name, expected in digests.items():
        if file_digest(dir_fd, str(name)) != expected:
            raise ValueError(f"its file {name} changed since it was saved")

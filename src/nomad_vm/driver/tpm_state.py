"""The TPM's state directory: `<task dir>/nomad-vm-tpm/`, kept with the task.

A TPM's state (its seeds and keys, NV storage, counters, and what a guest sealed to it, e.g.
BitLocker's key) must outlive a restart of the task, as a machine's TPM outlives a reboot.
The task's runtime directory is made per start and removed with it; the task's own directory
(Nomad's `<alloc>/<task>/`) lasts as long as the allocation, so the state lives there. The
journal lists it among what the task keeps (``volumes``), which the replay leaves; Nomad
removes it with the allocation directory.

swtpm runs as vm_user and gets the directory as a descriptor (``vm.swtpm``). The directory is
made here by the plugin (root), below the task directory through no symlink, and owned by
vm_user, mode 0700. Nomad's task directories are writable by the allocation's other tasks, so
an existing entry of that name that is a symlink, not a directory, or belongs to anybody but
root or vm_user is refused rather than used. The runtime-dir pattern of the allowlist
(`<alloc>/*/nomad-vm-*`) keeps jobs from naming anything in it as an image.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.vmm_user import VMMUser

TPM_STATE_DIR = "nomad-vm-tpm"


def open_tpm_state(path: Path, owner: VMMUser | None) -> int:
    """The state directory at ``path`` (made if missing), owned by ``owner`` (None: the
    plugin's own user), as a descriptor for swtpm; the caller closes it."""
    try:
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"cannot open the task directory {path.parent}: {exc}") from exc
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.name, 0o700, dir_fd=parent)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path.name, flags, dir_fd=parent)
    except OSError as exc:
        raise HypervisorError(f"cannot use {path} for the TPM's state: {exc}") from exc
    finally:
        os.close(parent)
    try:
        _own(fd, path, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _own(fd: int, path: Path, owner: VMMUser | None) -> None:
    st = os.fstat(fd)
    uid, gid = (owner.uid, owner.gid) if owner is not None else (os.geteuid(), os.getegid())
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid(), uid):
        raise HypervisorError(
            f"{path} belongs to uid {st.st_uid}, not to the plugin or vm_user: refusing to "
            "keep the TPM's state there (remove it)"
        )
    try:
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    except OSError as exc:
        raise HypervisorError(f"cannot give {path} to the VMM's user: {exc}") from exc

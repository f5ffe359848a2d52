"""Which host directories a VM task shares with its guest, and where the guest mounts them.

Nomad gives every task `alloc/` (shared by the allocation's tasks), `local/` and `secrets/`;
jobs add host volumes with `volume_mount` (except one backing a `disk { volume }`, which is
that disk's). They reach the guest over virtio-fs (a virtiofsd per
share, started with `--readonly` for read-only ones) or 9p (QEMU's `-fsdev local ... readonly`):
either way the host side refuses writes to a read-only share, whatever the guest mounts.
cloud-init mounts them (nomad_vm.cloudinit, `mounts:`).
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.driver.config import VMTaskConfig
from nomad_vm.driver.types import TaskConfig
from nomad_vm.errors import ConfigError
from nomad_vm.vm.spec import ShareSpec

# 9p mount tags are limited to 31 bytes (virtio-fs tags to 36); ours are short and fixed.
TASK_DIR_SHARES = (
    ("nomad-alloc", "alloc", "/alloc"),
    ("nomad-local", "local", "/local"),
    ("nomad-secrets", "secrets", "/secrets"),
)


def task_shares(task: TaskConfig, vm: VMTaskConfig) -> tuple[ShareSpec, ...]:
    shares: list[ShareSpec] = []
    if vm.share_task_dirs:
        for tag, name, guest_path in TASK_DIR_SHARES:
            host = Path(task.alloc_dir) / "alloc" if name == "alloc" else Path(task.task_dir) / name
            if host.is_dir():
                readonly = not (name == "alloc" and vm.writable_alloc_dir)
                shares.append(ShareSpec(tag, host, guest_path, readonly))
    # A mount backing a disk (`disk { volume }`) is the disk's, not a directory to share.
    disk_mounts = {d.volume_mount for d in vm.disks if d.volume_mount is not None}
    for i, mount in enumerate(task.mounts):
        if i in disk_mounts:
            continue
        if not mount.task_path.startswith("/"):
            raise ConfigError(
                f"volume_mount[{i}].destination",
                f"{mount.task_path!r} must be an absolute path inside the guest",
            )
        shares.append(
            ShareSpec(f"nomad-vol{i}", Path(mount.host_path), mount.task_path, mount.readonly)
        )
    return tuple(shares)

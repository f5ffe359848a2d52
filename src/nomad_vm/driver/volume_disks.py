"""Which of the task's volume_mounts backs a `disk { volume = "<name>" }`.

A job names a group `volume` and mounts it in the task with a `volume_mount`; Nomad hands the
driver the task's mounts (host path, destination, read-only), not the group's volume blocks.
Nomad 2.0.1 and later also send the volume's name (``TaskMount.request_name``), and then the
disk's mount is the one of that name. Earlier clients (this project tests on 1.11) send no name,
so the disk's mount is the one whose destination ends in the volume's name (e.g.
``destination = "/volumes/<name>"``): the job's own text is the only place that ties the two
together, and a name it must write twice is the least surprising rule. When any mount carries a
name, names alone decide (a destination that happens to end in another volume's name must not
match).

The matched mount is the disk's: it is not also shared into the guest as a directory
(``driver.shares`` skips it). A read-only mount gives a read-only disk (as it gives a read-only
share: the job need not say it twice); the start's event says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

from nomad_vm.driver.types import TaskMount
from nomad_vm.errors import ConfigError
from nomad_vm.storage.disk_device import check_read_only
from nomad_vm.storage.disk_request import DiskRequest


def attach_volume_mounts(
    disks: Sequence[DiskRequest], mounts: Sequence[TaskMount]
) -> tuple[DiskRequest, ...]:
    """``disks`` with each Nomad volume disk's mount filled in (ConfigError naming
    `disk[N].volume` and what to write when there is none, or more than one)."""
    named = any(m.request_name for m in mounts)
    taken: dict[int, str] = {}
    out = []
    for disk in disks:
        if not disk.nomad_volume:
            out.append(disk)
            continue
        index = _match(disk, mounts, named)
        if index in taken:
            raise ConfigError(
                f"{disk.field}.volume",
                f"{taken[index]} is already backed by the volume {disk.nomad_volume!r}; "
                "a volume backs one disk",
            )
        taken[index] = disk.field
        mount = mounts[index]
        if mount.readonly:
            why = f"its volume_mount ({mount.task_path}) is read-only, and "
            check_read_only(f"{disk.field}.bus_type", disk.bus, disk.kind, why)
        out.append(
            replace(
                disk,
                volume_mount=index,
                volume_host=Path(mount.host_path),
                read_only=disk.read_only or mount.readonly,
            )
        )
    return tuple(out)


def _match(disk: DiskRequest, mounts: Sequence[TaskMount], named: bool) -> int:
    name = disk.nomad_volume
    if named:
        found = [i for i, m in enumerate(mounts) if m.request_name == name]
        how = f"mounts the group volume {name!r}"
    else:
        found = [i for i, m in enumerate(mounts) if PurePosixPath(m.task_path).name == name]
        how = f"has a destination ending in {name!r}"
    if len(found) == 1:
        return found[0]
    field = f"{disk.field}.volume"
    if found:
        where = ", ".join(mounts[i].task_path for i in found)
        raise ConfigError(
            field, f"several volume_mounts of the task {how} ({where}); keep one for the disk"
        )
    hint = (
        f'add volume_mount {{ volume = "{name}", destination = "/volumes/{name}" }} to the '
        f'task, for the group\'s volume "{name}" {{ ... }}'
    )
    if not named:
        hint += (
            " (Nomad before 2.0.1 tells the driver a mount's destination but not its volume, "
            "so the destination must end in the volume's name)"
        )
    raise ConfigError(field, f"no volume_mount of the task {how}: {hint}")

"""StartTask's step for a disk backed by a Nomad volume (`disk { volume }`): the volume_mount's
host path (``driver.volume_disks`` matched it) opened once (``storage.volume_disk``), its
format the block's or, for a file or block device given none, detected; its backing chain
checked like an image's. The disk is the volume's data: it is journalled as kept (the replay
never removes it); only the hidden name a new disk file is made under is the task's."""

from __future__ import annotations

import asyncio

from nomad_vm.driver.events import EventBus
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.startup import StartPlan
from nomad_vm.errors import ConfigError, HypervisorError, ImageError
from nomad_vm.storage.chain import held_of, inspect_chain
from nomad_vm.storage.disk_request import MIB, DiskRequest
from nomad_vm.storage.held import HeldFile
from nomad_vm.storage.limits import USER_IMAGE_LIMITS
from nomad_vm.storage.paths import Allowlist
from nomad_vm.storage.pool import temp_path
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.storage.volume_disk import (
    VolumeRoot,
    disk_file_name,
    find_disk_file,
    is_block_device,
    make_disk_file,
    open_volume_root,
    reopen,
)
from nomad_vm.vm.spec import DiskSpec


async def prepare_volume_disk(
    plan: StartPlan, recorder: TaskRecorder, events: EventBus, index: int, request: DiskRequest
) -> DiskSpec:
    """Disk ``index`` of the task, backed by its Nomad volume: opened (or made) read-write,
    or read-only for a read-only disk or mount, with its backing chain checked."""
    if request.volume_host is None or request.volume_mount is None:
        raise ValueError("a volume disk's mount is matched when the config is parsed")
    field = f"{request.field}.volume"
    holder = plan.files.holder
    root = open_volume_root(field, request.volume_host, plan.allowed_dirs, holder)
    writable = not request.read_only
    if root.kind == "dir":
        probe, what = await _disk_file(plan, recorder, index, request, root)
        fmt: str | None = request.format  # the name says it: never probed
        # An overlay kept in the volume may have its base beside it.
        allowed = Allowlist(
            (*plan.allowed_dirs.roots, str(root.held.path)), plan.allowed_dirs.private
        )
    else:
        probe, fmt = root.held, request.source_format or None
        what = "block device" if root.kind == "block" else "file"
        allowed = plan.allowed_dirs
        recorder.volume(root.held.path)
    disk = reopen(field, probe, holder, writable=writable)
    chain = await asyncio.to_thread(
        inspect_chain, find_qemu_img(), disk, allowed, field, USER_IMAGE_LIMITS, holder, fmt
    )
    top = chain[0]
    if top.format not in ("raw", "qcow2"):
        raise ImageError(
            field,
            f"{disk.path} is {top.format}: a volume's disk is used in place, as raw or qcow2 "
            "(convert it with `qemu-img convert -O qcow2`)",
        )
    mount = plan.task.mounts[request.volume_mount]
    label = "Disk prepared" if index == 0 else f"Disk {index} prepared"
    detected = "" if fmt else " (detected; give format to pin it)"
    notes = ""
    if request.size_bytes is not None and request.size_bytes != top.virtual_size:
        # Never resized behind the guest's back: `size` is for the disk nomad-vm makes.
        notes = f" (size {request.size_bytes // MIB} MB applies to a new disk only)"
    if request.read_only:
        notes += ", read-only" + (" (its volume_mount is read-only)" if mount.readonly else "")
    events.emit(
        plan.task,
        f"{label}: Nomad volume {request.nomad_volume}, {what} {disk.path.name}, "
        f"{top.format}{detected}, {top.virtual_size // MIB} MB{notes}",
        {"disk": request.field, "path": str(disk.path), "volume": request.nomad_volume},
    )
    return DiskSpec(
        disk,
        top.format,
        tuple((held_of(level), level.format) for level in chain[1:]),
        bus=request.bus,
        kind=request.kind,
        serial=request.serial,
        cache=request.cache,
        block_device=is_block_device(disk),
    )


async def _disk_file(
    plan: StartPlan, recorder: TaskRecorder, index: int, request: DiskRequest, root: VolumeRoot
) -> tuple[HeldFile, str]:
    """The disk file of a directory volume (made now when missing) and what it is."""
    field = f"{request.field}.volume"
    holder = plan.files.holder
    name = disk_file_name(request.format)
    final = root.held.path / name
    probe = find_disk_file(field, root, name, holder)
    what = "existing"
    if probe is None:
        if request.read_only:
            raise ImageError(
                field,
                f"the volume holds no {name} yet, and a read-only disk cannot be made; run "
                "the task once with a writable volume_mount, or put the disk there",
            )
        if request.size_bytes is None:
            raise ConfigError(
                request.size_field,
                f"the volume holds no {name} yet: give the size of the disk nomad-vm makes "
                'there on first use (e.g. size = "10GiB")',
            )
        temp = temp_path(root.held.path, plan.task.id, index, "volume")
        await recorder.creating("disk", temp)
        try:
            made = await asyncio.to_thread(
                make_disk_file,
                find_qemu_img(),
                root,
                temp.name,
                name,
                request.format,
                request.size_bytes,
                sparse=request.sparse,
            )
        except OSError as exc:
            raise HypervisorError(
                f"cannot make {name} in the volume {root.held.path}: {exc.strerror or exc}"
            ) from None
        what = "new" if made else "existing (made by another task meanwhile)"
        probe = find_disk_file(field, root, name, holder)
        if probe is None:
            raise ImageError(field, f"{final} disappeared just after it was made")
    recorder.volume(final)
    return probe, f"{what} disk file"

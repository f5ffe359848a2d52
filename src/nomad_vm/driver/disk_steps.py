"""StartTask's disks: each of the task's disks (``VMTaskConfig.disks``, the primary first) is
made in the runtime dir, recorded in the journal before it exists, so the replay removes it
with the rest of the runtime dir. A disk with a source image is an overlay on it or a copy
(``storage.disk.prepare_boot_disk``: allowlist, chain checks, limits, descriptors, as for the
boot disk); one without is an empty image of its size. The VMM gets each as a descriptor
(read-only for `read_only` disks and cdroms)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.driver.events import EventBus
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.startup import StartPlan
from nomad_vm.storage.disk import make_empty_disk, prepare_boot_disk
from nomad_vm.storage.disk_request import MIB, DiskRequest
from nomad_vm.storage.held import HeldFile, open_own
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.spec import DiskSpec


@dataclass(frozen=True)
class TaskDisks:
    primary: DiskSpec | None
    others: tuple[DiskSpec, ...] = ()


def disk_files(plan: StartPlan) -> tuple[Path, ...]:
    """The files the disks will be, for the journal's first entry."""
    return tuple(plan.runtime_dir / d.file_name(i) for i, d in enumerate(plan.vm.disks))


async def prepare_disks(plan: StartPlan, recorder: TaskRecorder, events: EventBus) -> TaskDisks:
    specs = []
    images = plan.files.disk_images
    for index, request in enumerate(plan.vm.disks):
        image = images[index] if index < len(images) else None
        specs.append(await _prepare(plan, recorder, events, index, request, image))
    if not specs:
        return TaskDisks(None)
    return TaskDisks(specs[0], tuple(specs[1:]))


async def _prepare(
    plan: StartPlan,
    recorder: TaskRecorder,
    events: EventBus,
    index: int,
    request: DiskRequest,
    image: HeldFile | None,
) -> DiskSpec:
    name = request.file_name(index)
    path = plan.runtime_dir / name
    await recorder.creating("disk", path)
    qemu_img = find_qemu_img()
    holder = plan.files.holder
    chain: tuple[tuple[HeldFile, str], ...] = ()
    if image is None:
        if request.size_bytes is None:
            raise ValueError("a disk without a source has a size (checked when parsed)")
        await asyncio.to_thread(
            make_empty_disk,
            qemu_img,
            path,
            request.format,
            request.size_bytes,
            sparse=request.sparse,
        )
        what, size = "empty disk", request.size_bytes
        details = {"disk": request.field}
    else:
        disk = await asyncio.to_thread(
            prepare_boot_disk,
            qemu_img,
            image,
            plan.runtime_dir,
            thin=request.chained,
            size_mb=request.size_mb,
            allowed_dirs=plan.allowed_dirs,
            field=request.image_field,
            size_field=request.size_field,
            holder=holder,
            name=name,
            fmt=request.format,
            expected_format=request.source_format,
        )
        chain, size = disk.chain, disk.virtual_size
        how = "thin copy (qcow2 overlay)" if disk.thin else "full copy"
        what = f"{how} of {image.path.name}"
        details = {
            "disk": request.field,
            "image": str(image.path),
            "source_format": disk.source_format,
        }
    label = "Disk prepared" if index == 0 else f"Disk {index} prepared"
    events.emit(plan.task, f"{label}: {what}, {size // MIB} MB", details)
    return DiskSpec(
        open_own(path, holder, writable=not request.read_only),
        request.format,
        chain,
        bus=request.bus,
        kind=request.kind,
        serial=request.serial,
        cache=request.cache,
    )

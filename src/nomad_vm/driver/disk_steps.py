"""StartTask's disks: each of the task's disks (``VMTaskConfig.disks``, the primary first) is
made in the runtime dir, recorded in the journal before it exists, so the replay removes it
with the rest of the runtime dir. A disk with a source image is an overlay on it or a copy
(``storage.disk.prepare_boot_disk``: allowlist, chain checks, limits, descriptors, as for the
boot disk); one without is an empty image of its size; one backed by a Nomad volume is the
volume's data (``volume_disk_steps``). The VMM gets each as a descriptor
(read-only for `read_only` disks and cdroms)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from nomad_vm.driver.ceph_disks import prepare_ceph_disk
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.image_steps import NO_BACKING_FILES
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.snapshot_store import put_back
from nomad_vm.driver.startup import StartPlan
from nomad_vm.driver.volume_disk_steps import prepare_volume_disk
from nomad_vm.errors import ImageError
from nomad_vm.storage.chain import held_of, inspect_chain
from nomad_vm.storage.disk import make_empty_disk, prepare_boot_disk
from nomad_vm.storage.disk_request import MIB, DiskRequest
from nomad_vm.storage.held import FileHolder, HeldFile, open_allowed, open_own
from nomad_vm.storage.limits import USER_IMAGE_LIMITS
from nomad_vm.storage.paths import AllowedDirs
from nomad_vm.storage.pool import (
    ensure_pool,
    image_volume_name,
    pool_allowlist,
    publish,
    temp_path,
)
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.spec import DiskSpec


@dataclass(frozen=True)
class TaskDisks:
    primary: DiskSpec | None
    others: tuple[DiskSpec, ...] = ()


def disk_files(plan: StartPlan) -> tuple[Path, ...]:
    """The files the disks will be, for the journal's first entry."""
    disks = enumerate(plan.vm.disks)
    return tuple(plan.runtime_dir / d.file_name(i) for i, d in disks if d.in_file)


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
    if request.nomad_volume:
        return await prepare_volume_disk(plan, recorder, events, index, request)
    if request.ceph is not None:
        spec, what, size = await prepare_ceph_disk(plan, recorder, index, request, image)
        _event(plan, events, index, request, spec.rbd.image if spec.rbd else "", what, size)
        return spec
    pool = request.pool_dir
    # A downloaded image stands alone (image_steps); a local one may have a backing chain.
    allowed: AllowedDirs = NO_BACKING_FILES if request.url is not None else plan.allowed_dirs
    if pool is not None:
        await asyncio.to_thread(ensure_pool, pool)
        source = await _pool_source(plan, recorder, index, request, image, pool)
        if source is not None:
            image, allowed = source[0], pool_allowlist(pool)
            request = replace(request, source_format=source[1])
    if request.persistent and pool is not None:
        return await _pool_volume(plan, recorder, events, index, request, image, pool, allowed)
    path = plan.runtime_dir / request.file_name(index)
    await recorder.creating("disk", path)
    chain, size, what = await _make(plan, request, image, path, allowed)
    restore = plan.restore
    if restore is not None and await asyncio.to_thread(put_back, restore, path.parent, path.name):
        # Made as usual (so its chain was checked), then its contents are the snapshot's.
        what = f"{what}, its contents from the snapshot"
    return _announce(plan, events, index, request, path, chain, size, what)


async def _make(
    plan: StartPlan,
    request: DiskRequest,
    image: HeldFile | None,
    path: Path,
    allowed: AllowedDirs,
) -> tuple[tuple[tuple[HeldFile, str], ...], int, str]:
    """``path`` made from ``image`` (overlay or copy) or empty: (its backing chain, its
    virtual size, what it is for the event)."""
    qemu_img = find_qemu_img()
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
        return (), request.size_bytes, "empty disk"
    disk = await asyncio.to_thread(
        prepare_boot_disk,
        qemu_img,
        image,
        path.parent,
        thin=request.chained,
        size_mb=request.size_mb,
        allowed_dirs=allowed,
        field=request.image_field,
        size_field=request.size_field,
        holder=plan.files.holder,
        name=path.name,
        fmt=request.format,
        expected_format=request.source_format,
    )
    how = "thin copy (qcow2 overlay)" if disk.thin else "full copy"
    name = request.url.shown if request.url is not None else image.path.name
    return disk.chain, disk.virtual_size, f"{how} of {name}"


async def _pool_source(
    plan: StartPlan,
    recorder: TaskRecorder,
    index: int,
    request: DiskRequest,
    image: HeldFile | None,
    pool: Path,
) -> tuple[HeldFile, str] | None:
    """The pool volume the disk is made from and its format: `source.volume` (the format
    its `source.format` says, else qcow2: a pool volume is never probed, see
    ``chain.inspect_chain``), or the qcow2 volume its source image was written into (made
    now, unless a task with the same source already did)."""
    holder = plan.files.holder
    if request.source_volume:
        path = pool / request.source_volume
        held = _open_volume(f"{request.field}.source.volume", path, pool, holder)
        return held, request.source_format or "qcow2"
    if image is None:
        return None
    final = pool / image_volume_name(image)
    if not final.exists():
        temp = temp_path(pool, plan.task.id, index, "import")
        await recorder.creating("disk", temp)
        copy = DiskRequest(request.field, image=image.path, source_format=request.source_format)
        await _make(plan, copy, image, temp, plan.allowed_dirs)
        await asyncio.to_thread(publish, temp, final)
    recorder.volume(final)
    return _open_volume(request.image_field, final, pool, holder), "qcow2"


async def _pool_volume(
    plan: StartPlan,
    recorder: TaskRecorder,
    events: EventBus,
    index: int,
    request: DiskRequest,
    source: HeldFile | None,
    pool: Path,
    allowed: AllowedDirs,
) -> DiskSpec:
    """The disk is the pool volume `name`: made (from ``source`` or empty) when missing,
    else used as it is, in the `format` the disk block says, with its backing chain inside
    the pool."""
    final = pool / request.volume_name
    field = f"{request.field}.name"
    what = "existing pool volume"
    if not final.exists():
        temp = temp_path(pool, plan.task.id, index, "volume")
        await recorder.creating("disk", temp)
        _, _, what = await _make(plan, request, source, temp, allowed)
        what = f"new pool volume, {what}"
        if not await asyncio.to_thread(publish, temp, final):
            what = "existing pool volume (made by another task meanwhile)"
    recorder.volume(final)
    chain = await asyncio.to_thread(
        inspect_chain,
        find_qemu_img(),
        final,
        pool_allowlist(pool),
        field,
        USER_IMAGE_LIMITS,
        plan.files.holder,
        request.format,  # never probed: the guest wrote it
    )
    top = chain[0]
    backing = tuple((held_of(level), level.format) for level in chain[1:])
    spec_request = replace(request, format=top.format)
    return _announce(
        plan,
        events,
        index,
        spec_request,
        final,
        backing,
        top.virtual_size,
        f"{what} {request.volume_name}",
    )


def _open_volume(field: str, path: Path, pool: Path, holder: FileHolder) -> HeldFile:
    if not path.exists():
        raise ImageError(field, f"the storage pool has no volume {path.name!r} ({pool})")
    return open_allowed(
        field,
        path,
        pool_allowlist(pool),
        holder,
        subject=str(path),
        advice="a pool volume must lie in its pool's directory",
    )


def _event(
    plan: StartPlan,
    events: EventBus,
    index: int,
    request: DiskRequest,
    where: str,
    what: str,
    size: int,
) -> None:
    label = "Disk prepared" if index == 0 else f"Disk {index} prepared"
    details = {"disk": request.field, "path": where}
    if request.image is not None:
        details["image"] = str(request.image)
    elif request.url is not None:
        details["image"] = request.url.shown
    events.emit(plan.task, f"{label}: {what}, {size // MIB} MB", details)


def _announce(
    plan: StartPlan,
    events: EventBus,
    index: int,
    request: DiskRequest,
    path: Path,
    chain: tuple[tuple[HeldFile, str], ...],
    size: int,
    what: str,
) -> DiskSpec:
    _event(plan, events, index, request, str(path), what, size)
    return DiskSpec(
        open_own(path, plan.files.holder, writable=not request.read_only),
        request.format,
        chain,
        bus=request.bus,
        kind=request.kind,
        serial=request.serial,
        cache=request.cache,
    )

"""StartTask's disks in a Ceph pool: RBD images made through the bindings
(``storage.rbd_volumes``), each recorded in the task's journal before it is made.

What a disk becomes:

* ``source.image``: the image is written once into the pool as ``<image>-<hash>`` (the same
  name a directory pool gives it, without the suffix: reused while the source is unchanged)
  with a protected snapshot ``nomad-vm-base``; the disk is a clone of that snapshot
  (``chained``: copy-on-write) or a flattened clone (an independent copy).
* ``source.volume``: ``chained``: a clone of a protected snapshot of the volume, taken for
  this task (removed with it, after the clone); otherwise a full copy of the volume.
* neither: an empty image of ``size``.
* ``size`` grows the image; a smaller size than the source is refused (a shrink loses data).

Which images stay: a disk with ``name`` is the pool volume of that name (made under an
in-progress name, then renamed, which never replaces a volume; used as it is when present),
and imported source images stay for the next task. Everything else the task made (its own
images ``nomad-vm-<task hash>-<n>``, in-progress names, its snapshots) is in the journal's
``rbd`` and removed by the replay, on destroy or a failed start, even by a plugin that never
saw the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

from nomad_vm.driver.journal import RbdRecord
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.startup import StartPlan
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.storage import rbd_volumes as rbd_ops
from nomad_vm.storage.ceph_pool import CephPool, connect
from nomad_vm.storage.chain import held_of, inspect_chain
from nomad_vm.storage.disk_request import MIB, DiskRequest
from nomad_vm.storage.held import HeldFile
from nomad_vm.storage.limits import USER_IMAGE_LIMITS
from nomad_vm.storage.pool import image_volume_name
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.spec import DiskSpec, RbdSpec

_T = TypeVar("_T")


def own_image_name(task_id: str, index: int) -> str:
    """The task's own image for disk ``index`` (also the stem of its in-progress names)."""
    return f"nomad-vm-{hashlib.sha256(task_id.encode()).hexdigest()[:20]}-{index}"


class _Session:
    """One connection to the pool for the disk's steps, each run off the event loop."""

    def __init__(self, pool: CephPool) -> None:
        self.pool = pool
        self._stack = contextlib.ExitStack()
        self.rbd: Any = None
        self.ioctx: Any = None

    async def open(self) -> None:
        _, self.rbd, self.ioctx = await asyncio.to_thread(self._stack.enter_context,
                                                          connect(self.pool))  # fmt: skip

    async def close(self) -> None:
        await asyncio.to_thread(self._stack.close)

    async def run(self, op: Callable[..., _T], *args: object) -> _T:
        return await asyncio.to_thread(op, self.rbd, self.ioctx, *args)


async def prepare_ceph_disk(
    plan: StartPlan,
    recorder: TaskRecorder,
    index: int,
    request: DiskRequest,
    image: HeldFile | None,
) -> tuple[DiskSpec, str, int]:
    """The disk as an RBD image: (its spec, what it is for the event, its size)."""
    pool = request.ceph
    if pool is None:
        raise ValueError("not a Ceph disk")
    session = _Session(pool)
    await session.open()
    try:
        return await _prepare(session, plan, recorder, index, request, image)
    finally:
        await session.close()


async def _prepare(
    s: _Session,
    plan: StartPlan,
    recorder: TaskRecorder,
    index: int,
    request: DiskRequest,
    image: HeldFile | None,
) -> tuple[DiskSpec, str, int]:
    pool = s.pool
    own = own_image_name(plan.task.id, index)
    parent: tuple[str, str] | None = None
    source_note = ""
    if image is not None:
        parent = (await _imported(s, plan, recorder, own, request, image), rbd_ops.BASE_SNAPSHOT)
        source_note = f" of {image.path.name}"
    elif request.source_volume:
        field = f"{request.field}.source.volume"
        if not await s.run(rbd_ops.exists, request.source_volume):
            raise ImageError(field, f"the Ceph pool {pool.label!r} has no volume "
                             f"{request.source_volume!r} (pool {pool.pool})")  # fmt: skip
        await _refuse_in_use(s, field, request.source_volume)
        if request.chained:
            snap = f"{own}-snap"
            await recorder.creating_rbd(RbdRecord(pool.label, request.source_volume, snap))
            await s.run(rbd_ops.protected_snapshot, request.source_volume, snap)
            parent = (request.source_volume, snap)
        source_note = f" of volume {request.source_volume}"

    async def make(name: str) -> str:
        if parent is not None:
            await s.run(rbd_ops.clone, parent[0], parent[1], name)
            # A kept volume must not hang from this task's snapshot, which goes with it.
            task_snapshot = parent[1] != rbd_ops.BASE_SNAPSHOT
            flat = not request.chained or (request.persistent and task_snapshot)
            if flat:
                await s.run(rbd_ops.flatten, name)
            what = "copy" if flat else "clone (copy-on-write)"
        elif request.source_volume:
            await s.run(rbd_ops.copy, request.source_volume, name)
            what = "copy"
        else:
            if request.size_bytes is None:
                raise ValueError("a disk without a source has a size (checked when parsed)")
            await s.run(rbd_ops.create, name, request.size_bytes)
            return "empty RBD image"
        await _resize(s, request, name)
        return f"RBD {what}{source_note}"

    if request.persistent:
        name = request.volume_name
        what = "existing Ceph volume"
        if await s.run(rbd_ops.exists, name):
            await _refuse_in_use(s, f"{request.field}.name", name)
        else:
            temp = f"{own}-volume"
            await recorder.creating_rbd(RbdRecord(pool.label, temp))
            what = f"new Ceph volume, {await make(temp)}"
            if not await s.run(rbd_ops.rename, temp, name):
                await s.run(rbd_ops.remove, temp)
                what = "existing Ceph volume (made by another task meanwhile)"
        recorder.volume_name(f"ceph:{pool.label}/{name}")
        what = f"{what} {name}"
    else:
        name = own
        await recorder.creating_rbd(RbdRecord(pool.label, name))
        what = await make(name)
    size = await s.run(rbd_ops.size_of, name)
    spec = DiskSpec(
        None,
        "raw",
        bus=request.bus,
        kind=request.kind,
        serial=request.serial,
        cache=request.cache,
        rbd=RbdSpec(pool, name, read_only=request.read_only),
    )
    return spec, f"{what} in Ceph pool {pool.label} ({pool.pool}/{name})", size


async def _refuse_in_use(s: _Session, field: str, name: str) -> None:
    """Two VMs writing one image corrupt it, and a copy or snapshot of an image a VM is
    writing is torn: refused, as QEMU's image lock refuses it in a directory pool."""
    if await s.run(rbd_ops.in_use, name):
        raise ImageError(
            field,
            f"the Ceph volume {name!r} is in use (open by another VM; one killed without "
            "closing it holds it until Ceph's watch timeout, 30 s by default)",
        )


async def _resize(s: _Session, request: DiskRequest, name: str) -> None:
    if request.size_bytes is None:
        return
    current = await s.run(rbd_ops.size_of, name)
    if request.size_bytes < current:
        raise ConfigError(
            request.size_field,
            f"{request.size_bytes // MIB} MiB is smaller than the source's {current // MIB} MiB "
            "(a disk is never shrunk: that would cut off data)",
        )
    await s.run(rbd_ops.grow, name, request.size_bytes)


async def _imported(
    s: _Session,
    plan: StartPlan,
    recorder: TaskRecorder,
    own: str,
    request: DiskRequest,
    image: HeldFile,
) -> str:
    """The pool's image of ``image`` (written now unless a task with the same source did)."""
    pool = s.pool
    base = image_volume_name(image).removesuffix(".qcow2")
    if not await s.run(rbd_ops.exists, base):
        chain = await asyncio.to_thread(
            inspect_chain,
            find_qemu_img(),
            image,
            plan.allowed_dirs,
            request.image_field,
            USER_IMAGE_LIMITS,
            plan.files.holder,
            request.source_format or None,
        )
        top = chain[0]
        if request.source_format and top.format != request.source_format:
            raise ImageError(request.image_field, f"{top.path} is {top.format}, not "
                             f"{request.source_format} as the task says")  # fmt: skip
        temp = f"{own}-import"
        await recorder.creating_rbd(RbdRecord(pool.label, temp))
        await s.run(rbd_ops.create, temp, top.virtual_size)
        levels = [(held_of(level), level.format) for level in chain]
        data = sum(level.actual_size or 0 for level in chain)
        limits = USER_IMAGE_LIMITS.for_conversion(data)
        await asyncio.to_thread(rbd_ops.import_image, find_qemu_img(), levels, pool, temp, limits)
        await s.run(rbd_ops.protected_snapshot, temp, rbd_ops.BASE_SNAPSHOT)
        if not await s.run(rbd_ops.rename, temp, base):
            await s.run(rbd_ops.remove, temp)  # another task imported it meanwhile
    recorder.volume_name(f"ceph:{pool.label}/{base}")
    return base

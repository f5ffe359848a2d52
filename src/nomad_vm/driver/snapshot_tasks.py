"""Snapshots as the driver's task operations see them: looked for at StartTask, saved at
StopTask (`snapshot_on_stop`) or at an operator's request (`nomad-vm vm snapshot`). The
policy and the record are ``snapshots``; the files ``snapshot_store``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from nomad_vm.driver import snapshots
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.snapshot_store import SNAPSHOT_DIR
from nomad_vm.driver.startup import StartPlan
from nomad_vm.driver.task import TERM_GRACE, VMTask
from nomad_vm.errors import HypervisorError, NomadVMError, Unsupported

log = logging.getLogger(__name__)

MIB = 1 << 20
WHERE = f"local/{SNAPSHOT_DIR}"


async def with_restore(plan: StartPlan, events: EventBus, key: Callable[[], bytes]) -> StartPlan:
    """The plan, resuming the task's snapshot when one matches it; a refused one is said in
    a task event (and removed: the VM boots)."""
    found = await asyncio.to_thread(snapshots.find_restore, plan, key)
    if found.refused is not None:
        events.emit(
            plan.task,
            f"Snapshot refused, the VM boots instead (the snapshot is removed): {found.refused}",
        )
    if found.restore is None:
        return plan
    return replace(plan, restore=found.restore)


async def after_start(plan: StartPlan, events: EventBus, error: BaseException | None) -> None:
    """Once the start is over: a snapshot it resumed (or failed to) is removed, so a later
    start never resumes the same state twice."""
    restore = plan.restore
    if restore is None:
        return
    await asyncio.to_thread(snapshots.consume, restore, Path(plan.task.task_dir))
    if error is None:
        events.emit(plan.task, snapshots.restored_event(restore))
    elif isinstance(error, Exception):
        events.emit(
            plan.task,
            f"Resuming the snapshot failed ({error}); it is removed, so the next start boots "
            "the VM",
        )


async def save_on_stop(entry: VMTask, key: Callable[[], bytes]) -> bool:
    """StopTask of a `snapshot_on_stop` task: save the VM, then end its VMM. False when the
    task does not save (or the save failed: the caller then stops the VM as usual)."""
    vm = entry.vm
    runtime_dir = Path(entry.journal.runtime_dir)
    if vm is None or not entry.running or not entry.capabilities.snapshot:
        return False
    setup = await asyncio.to_thread(snapshots.armed, runtime_dir)
    if setup is None or not setup.get("on_stop"):
        return False
    task_dir = Path(entry.config.task_dir)
    try:
        saved = await snapshots.save(vm, task_dir, runtime_dir, setup, keep_running=False, key=key)
    except (NomadVMError, OSError) as exc:
        log.warning("saving the VM of %s failed: %s", entry.config.id, exc)
        entry.emit(f"Snapshot failed ({exc}): the VM is stopped without one")
        return False
    entry.stopping = True
    entry.emit(
        f"VM paused and saved ({saved // MIB} MB of memory, with its disks) in {WHERE}: "
        "the next start of the task resumes it"
    )
    await vm.terminate(TERM_GRACE)
    await entry.wait()
    return True


async def snapshot_now(entry: VMTask, key: Callable[[], bytes]) -> dict[str, object]:
    """`nomad-vm vm snapshot`: save the running VM now, copying its disks, and let it run on
    (a paused one stays paused). The next start of the task resumes this state, unless a
    stop with `snapshot_on_stop` saves a newer one first."""
    if not entry.capabilities.snapshot:
        raise Unsupported(f"the {entry.journal.backend} backend cannot save snapshots")
    vm = entry.vm
    if vm is None or not entry.running:
        raise Unsupported("snapshot: the VM is not running")
    if entry.stopping:
        raise Unsupported("snapshot: the task is being stopped")
    runtime_dir = Path(entry.journal.runtime_dir)
    setup = await asyncio.to_thread(snapshots.armed, runtime_dir)
    if setup is None:
        raise Unsupported(
            "snapshot: this VM was started by a plugin without snapshots; restart the task"
        )
    task_dir = Path(entry.config.task_dir)
    try:
        saved = await snapshots.save(vm, task_dir, runtime_dir, setup, keep_running=True, key=key)
    except OSError as exc:
        raise HypervisorError(f"snapshot: {exc}") from exc
    where = task_dir / "local" / SNAPSHOT_DIR
    entry.emit(
        f"VM saved by the operator ({saved // MIB} MB of memory, with a copy of its disks) in "
        f"{WHERE}: the next start of the task resumes it"
    )
    return {"path": str(where), "memory_bytes": saved}

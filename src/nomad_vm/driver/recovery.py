"""RecoverTask: a VM an earlier plugin process started, found again (never booted a second time).

The task's journal comes from disk (the latest), else from Nomad's handle (saved again so that
a later DestroyTask by id finds it); its backend reattaches to the VM it names. A VM that is
gone makes an exited task saying so. A VM found has its image leases taken again, its network
reconciled (the address lease back in place, leases no journal knows dropped), its watchers
started, and a paused VM is reported as such. ``VMDriver.recover_task`` calls these in order.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from nomad_vm.driver.events import EventBus
from nomad_vm.driver.image_steps import hold_leases
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.memory_policy import DEFAULT_SETTINGS, PolicySettings
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.driver.pause import report_if_paused
from nomad_vm.driver.task import VMTask
from nomad_vm.driver.types import ExitResult, TaskConfig, TaskHandle
from nomad_vm.errors import ConfigError, HypervisorError, NetworkError
from nomad_vm.network.settings import BridgeNetwork
from nomad_vm.vm.hypervisor import Hypervisor

log = logging.getLogger(__name__)


def superseded_starts(
    journals: list[TaskJournal], task: TaskConfig, running: Collection[str]
) -> list[TaskJournal]:
    """Journals of earlier starts of ``task`` (same allocation, same task name, another id)
    that this plugin neither runs nor is starting (``running``: those ids; a start under way
    is not stale, even of a task of the same name).

    Nomad gives every start of a task a new id (``<alloc>/<task>/<random>``) and runs one
    start of a task per allocation at a time. When a plugin dies and its successor dies too
    before Nomad could recover a task through it, Nomad gives up on that start and starts the
    task again under a new id; it never calls RecoverTask or DestroyTask for the old id, whose
    VM would run on beside the new one, unknown to everyone (the cluster bed's chaos run found
    it: two VMs for one allocation). Such a journal is stale by the time the new start comes.
    """
    prefix = f"{task.alloc_id}/{task.name}/"
    return [
        j
        for j in journals
        if j.task_id.startswith(prefix) and j.task_id != task.id and j.task_id not in running
    ]


def recovered_journal(journals: JournalStore, task_id: str, handle: TaskHandle) -> TaskJournal:
    """The journal on disk (the latest); else the copy in Nomad's handle, saved again so
    that a later DestroyTask by id finds it."""
    try:
        found = journals.load(task_id)
    except HypervisorError as exc:
        log.warning("using the journal in Nomad's handle of %s: %s", task_id, exc)
        found = None
    if found is not None:
        return found
    journal = TaskJournal.decode(handle.driver_state)
    if journal.task_id != task_id:
        raise HypervisorError(f"the handle of {task_id} holds the journal of {journal.task_id}")
    journals.save(journal)
    return journal


async def reattach(
    task: TaskConfig, journal: TaskJournal, backend: Hypervisor, events: EventBus
) -> VMTask:
    """The task's entry with the VM its journal names (``vm`` set), or, when that VM is gone
    (or the start never got as far as the VMM), an exited entry (``vm`` None) saying why."""
    ref = journal.vm_ref()
    try:
        if ref is None:
            raise HypervisorError("its start never got as far as the VMM")
        vm = await backend.reattach(ref)
    except HypervisorError as exc:
        entry = VMTask(task, None, journal, events, backend.capabilities)
        gone = f"VM ended while the plugin was not running: {exc}"
        entry.mark_exited(ExitResult(exit_code=1, err=gone))
        return entry
    return VMTask(task, vm, journal, events, backend.capabilities)


async def resume_recovered(
    entry: VMTask,
    journals: JournalStore,
    networks: NetworkManager,
    network: BridgeNetwork | None,
    events: EventBus,
    memory_policy: PolicySettings = DEFAULT_SETTINGS,
) -> None:
    """A reattached VM's task goes on: image leases held, network reconciled (a failure is
    logged: the VM runs), watchers started, the reattach and a paused VM told as events."""
    task, journal = entry.config, entry.journal
    await hold_leases(journal)
    if journal.network is not None:
        owners = {j.task_id for j in journals.all() if j.network is not None}
        try:
            repairs = await networks.reconcile(journal.network, network, owners)
            for repair in repairs:
                events.emit(task, f"Network reconciled: {repair}")
        except (NetworkError, ConfigError) as exc:
            log.warning("reconciling the network of %s failed: %s", task.id, exc)
    entry.start_watching(memory_policy)
    vmm = journal.vmm
    events.emit(task, "Reattached to the running VM", {"pid": str(vmm.pid if vmm else "")})
    await report_if_paused(entry)

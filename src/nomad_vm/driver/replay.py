"""Undo what a task's journal says exists on the host: the one clean-up path.

It serves a start that failed, DestroyTask of a task this plugin runs or recovered, and
DestroyTask of a task a plugin killed mid-StartTask left behind (nobody answered Nomad, so only
the journal knows). Every step is idempotent: the journal records changes before they are made,
so some of what it names may never have existed. Order: processes first (the VMM, then its
helpers; waited for, so the TAP and files are free), then the task's cgroup (empty by
then), then the network, then the RBD images
and snapshots the task made in Ceph pools (newest first: a clone before the snapshot it hangs
from; the pool's credentials come from the plugin config, never the journal), then files and
the runtime directory, and the task's leases on cached images (its VMM, which read them, is
gone by then). A failure (the network could not be torn down) is raised after the rest is
done; the caller then keeps the journal so that a later DestroyTask can try again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from nomad_vm.driver.journal import RbdRecord, TaskJournal
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.errors import HypervisorError
from nomad_vm.network.settings import BridgeNetwork
from nomad_vm.storage import rbd_volumes
from nomad_vm.storage.ceph_pool import CephPool, connect
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.vm.cgroups import remove_cgroup_dirs
from nomad_vm.vm.process import end_processes

log = logging.getLogger(__name__)

# SIGKILL is immediate; a process still there after this is stuck in the kernel.
PROCESS_EXIT_TIMEOUT = 10.0


async def undo_host_changes(
    journal: TaskJournal,
    networks: NetworkManager,
    net: BridgeNetwork | None,
    ceph: Mapping[str, CephPool] | None = None,
) -> None:
    failures: list[str] = []
    vmm = journal.vmm
    ordered = ([vmm] if vmm is not None else []) + list(journal.helpers)
    stuck = await asyncio.to_thread(end_processes, ordered, PROCESS_EXIT_TIMEOUT)
    if stuck:
        failures.append(f"processes {stuck} did not end after SIGKILL")
    if journal.cgroups:
        failures += await asyncio.to_thread(remove_cgroup_dirs, journal.cgroups)
    if journal.network is not None:
        try:
            await networks.teardown(journal.network, net)
        except HypervisorError as exc:
            failures.append(str(exc))
    if journal.rbd:
        failures += await asyncio.to_thread(_remove_rbd, journal.rbd, ceph or {})
    await asyncio.to_thread(_remove_files, journal)
    for lease in journal.image_leases:
        try:
            await asyncio.to_thread(ImageStore.of_lease(Path(lease)).release, Path(lease))
        except (OSError, ValueError) as exc:  # ValueError: not a lease path of a cache
            failures.append(f"cannot release the image lease {lease}: {exc}")
    if failures:
        raise HypervisorError(
            f"clean-up of task {journal.task_id} is incomplete: {'; '.join(failures)}"
        )


def _remove_rbd(records: tuple[RbdRecord, ...], ceph: Mapping[str, CephPool]) -> list[str]:
    """Remove the records' images and snapshots, newest first; what could not be removed."""
    failures: list[str] = []
    for label in dict.fromkeys(r.pool for r in records):
        pool = ceph.get(label)
        if pool is None:
            failures.append(f"Ceph pool {label!r} is no longer configured: cannot remove "
                            f"{', '.join(str(r) for r in records if r.pool == label)}")  # fmt: skip
            continue
        try:
            with connect(pool) as (_, rbd, ioctx):
                for record in reversed([r for r in records if r.pool == label]):
                    if record.snapshot:
                        rbd_volumes.remove_snapshot(rbd, ioctx, record.image, record.snapshot)
                    else:
                        rbd_volumes.remove(rbd, ioctx, record.image)
        except Exception as exc:  # the bindings raise their own types; the journal is kept
            failures.append(f"removing RBD images of Ceph pool {label!r}: {exc}")
    return failures


def _remove_files(journal: TaskJournal) -> None:
    for name in reversed(journal.files):
        try:
            Path(name).unlink(missing_ok=True)
        except OSError as exc:  # the directory below takes it, or says why not
            log.warning("cannot remove %s: %s", name, exc)
    if journal.runtime_dir:
        shutil.rmtree(journal.runtime_dir, ignore_errors=True)

"""Undo what a task's journal says exists on the host: the one clean-up path.

It serves a start that failed, DestroyTask of a task this plugin runs or recovered, and
DestroyTask of a task a plugin killed mid-StartTask left behind (nobody answered Nomad, so only
the journal knows). Every step is idempotent: the journal records changes before they are made,
so some of what it names may never have existed. Order: processes first (the VMM, then its
helpers; waited for, so the TAP and files are free), then the network, then files and the
runtime directory, and the task's leases on cached images (its VMM, which read them, is gone
by then). A failure (the network could not be torn down) is raised after the rest is
done; the caller then keeps the journal so that a later DestroyTask can try again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.errors import HypervisorError
from nomad_vm.network.settings import BridgeNetwork
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.vm.process import end_processes

log = logging.getLogger(__name__)

# SIGKILL is immediate; a process still there after this is stuck in the kernel.
PROCESS_EXIT_TIMEOUT = 10.0


async def undo_host_changes(
    journal: TaskJournal, networks: NetworkManager, net: BridgeNetwork | None
) -> None:
    failures: list[str] = []
    vmm = journal.vmm
    ordered = ([vmm] if vmm is not None else []) + list(journal.helpers)
    stuck = await asyncio.to_thread(end_processes, ordered, PROCESS_EXIT_TIMEOUT)
    if stuck:
        failures.append(f"processes {stuck} did not end after SIGKILL")
    if journal.network is not None:
        try:
            await networks.teardown(journal.network, net)
        except HypervisorError as exc:
            failures.append(str(exc))
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


def _remove_files(journal: TaskJournal) -> None:
    for name in reversed(journal.files):
        try:
            Path(name).unlink(missing_ok=True)
        except OSError as exc:  # the directory below takes it, or says why not
            log.warning("cannot remove %s: %s", name, exc)
    if journal.runtime_dir:
        shutil.rmtree(journal.runtime_dir, ignore_errors=True)

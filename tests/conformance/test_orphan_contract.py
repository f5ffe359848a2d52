"""A VM whose StartTask never reached Nomad (the plugin died right after starting it, and Nomad
gave up on the task: "Error was unrecoverable") is nobody's: Nomad has no handle, so it calls
neither RecoverTask nor DestroyTask. A fresh plugin stops it once Nomad's recovery round is
over (``driver/orphans.py``), and leaves alone what Nomad claims. The grace and quiet times
are shortened here; the cluster bed's chaos run meets the real ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nomad_vm.driver import orphans
from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.types import TaskState
from nomad_vm.processes import is_same_process
from tests.conformance import test_hypervisor_contract as contract
from tests.conformance.kits import Kit
from tests.conformance.test_hypervisor_contract import (
    assert_clean,
    journal_of,
    run,
    stop_and_destroy,
)
from tests.conftest import wait_until

kit = contract.kit


async def first_fingerprint(driver: VMDriver) -> None:
    """What Nomad asks first of a plugin it launched (the sweeps start there)."""
    async for _ in driver.fingerprints():
        return


def test_an_unclaimed_vm_is_stopped_and_a_recovered_one_kept(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orphans, "UNCLAIMED_GRACE", 1.0)
    monkeypatch.setattr(orphans, "RECOVERY_QUIET", 0.5)
    monkeypatch.setattr(orphans, "CHECK_EVERY", 0.1)

    async def scenario() -> None:
        first = kit.driver()
        lost = kit.task("lost")
        kept = kit.task("kept")
        await first.start_task(lost)  # its answer never reached Nomad
        handle, _ = await first.start_task(kept)
        lost_vmm = journal_of(kit, lost).vmm
        assert lost_vmm is not None
        await first.shutdown()

        fresh = kit.driver()
        await first_fingerprint(fresh)
        await fresh.recover_task(kept, handle)
        store = JournalStore(kit.data_dir)
        gone = lambda: store.load(lost.id) is None  # noqa: E731
        assert await asyncio.to_thread(wait_until, gone, 30.0), "the unclaimed VM was kept"
        assert not is_same_process(lost_vmm)
        assert not list(Path(lost.task_dir).glob("nomad-vm-*"))
        # Claimed by Nomad: still running, the same VM.
        assert (await fresh.inspect_task(kept.id)).state == TaskState.RUNNING
        await stop_and_destroy(fresh, kept)
        await fresh.shutdown()
        # Nothing of either is left (no process, journal, file or cgroup).
        await assert_clean(kit, kept)
        await assert_clean(kit, lost)

    run(scenario)

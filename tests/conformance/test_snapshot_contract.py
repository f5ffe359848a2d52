"""snapshot_on_stop, every backend that declares ``snapshot``: a counting guest is saved when
its task stops, and the task's next start in the allocation (a new task id, the same task
directory, as Nomad's restart) resumes it: the counter goes on from the next number, the guest
does not boot again, the snapshot is used once, and nothing is left.

QEMU runs the tiny guest (its shell keeps the counter). Cloud Hypervisor's fake VMM keeps the
counter in its simulated guest memory and implements ``vm.snapshot``/``vm.restore`` as CH's
API does (a paused VM, a directory named by URL, the device ids of the state matching the
config's): a test of our save and restore through CH's API and the plugin's way station, not
of CH. The real plugin with QEMU: tests/integration/test_snapshot.py; a real Nomad agent:
tests/e2e/test_snapshot_agent.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.driver.snapshot_store import SNAPSHOT_DIR
from nomad_vm.driver.snapshot_tasks import snapshot_now
from nomad_vm.driver.types import TaskConfig
from nomad_vm.vm.cloud_hypervisor.files import VMM_DIR
from tests.conformance import test_hypervisor_contract as contract
from tests.conformance.kits import BOOTED, CH_FAKE_BOOTED, Behaviour, Kit
from tests.conformance.test_hypervisor_contract import (
    assert_clean,
    run,
    stop_and_destroy,
    watching,
)

kit = contract.kit
COUNT = re.compile(rb"count (\d+)")
COUNTS = Behaviour(counts=True)
# The task's directories would be shared over virtio-fs, whose state no backend can save.
OPTIONS = {"snapshot_on_stop": True, "share_task_dirs": False}


def console(task: TaskConfig) -> bytes:
    return Path(task.stdout_path).read_bytes()


def counts(data: bytes) -> list[int]:
    return [int(n) for n in COUNT.findall(data)]


async def counted_to(task: TaskConfig, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while max(counts(console(task)), default=0) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest did not count to {n}: {console(task)[-300:]!r}")
        await asyncio.sleep(0.1)


def test_a_stopped_task_resumes_where_it_was(kit: Kit) -> None:
    if not kit.capabilities.snapshot:
        pytest.skip(f"{kit.name} does not save snapshots")

    async def scenario() -> None:
        driver = kit.driver()
        # CH: with the task's disk and seed too (their descriptors are new at the restore).
        options = {**OPTIONS, **kit.every_step()} if kit.is_ch else OPTIONS
        task = kit.task("snap", COUNTS, options=options)
        snapshot = Path(task.task_dir) / "local" / SNAPSHOT_DIR
        again = replace(task, id=f"{task.id}-2")
        async with watching(driver) as events:
            await driver.start_task(task)
            await counted_to(task, 3)
            await stop_and_destroy(driver, task)
            await events.wait_for("VM paused and saved")
            assert snapshot.is_dir() and (snapshot / "state").is_file()
            last = counts(console(task))[-1]
            await assert_clean(kit, task)

            # The next start's output, alone (Nomad's is a new FIFO read from its start).
            Path(again.stdout_path).write_bytes(b"")
            await driver.start_task(again)
            await events.wait_for("VM restored from snapshot")
            assert not snapshot.exists(), "a snapshot is used once"
            await counted_to(again, last + 3)
            after = console(again)
            assert counts(after)[0] == last + 1, (last, after[:300])
            assert BOOTED not in after and CH_FAKE_BOOTED not in after, after[:300]
            if kit.is_ch:
                # The way station is gone once CH has the memory.
                runtime_dir = Path(driver._tasks[again.id].journal.runtime_dir)
                assert sorted(p.name for p in (runtime_dir / VMM_DIR).iterdir()) == ["vsock.sock"]
            await driver.destroy_task(again.id, force=True)  # killed: no new snapshot
        assert not snapshot.exists()
        await assert_clean(kit, again)

    run(scenario)


def test_an_operators_snapshot_lets_the_vm_run_on_and_a_later_start_resumes_it(
    kit: Kit,
) -> None:
    """`nomad-vm vm snapshot`: saved while running (its disks copied), resumed after; the task
    is then killed (no save at a stop), and its next start continues from the saved count."""
    if not kit.capabilities.snapshot:
        pytest.skip(f"{kit.name} does not save snapshots")

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("snapnow", COUNTS, options={"share_task_dirs": False})
        again = replace(task, id=f"{task.id}-2")
        async with watching(driver) as events:
            await driver.start_task(task)
            await counted_to(task, 3)
            before_save = counts(console(task))[-1]
            saved = await snapshot_now(driver._tasks[task.id], driver._snapshot_key)
            assert saved["memory_bytes"] > 0
            await events.wait_for("VM saved by the operator")
            # The saved count is between the two (the VM may have counted on since).
            at_save = counts(console(task))[-1]
            # Running on: it counts past the saved state.
            await counted_to(task, at_save + 3)
            await driver.destroy_task(task.id, force=True)
            await assert_clean(kit, task)

            Path(again.stdout_path).write_bytes(b"")
            await driver.start_task(again)
            await events.wait_for("VM restored from snapshot")
            await counted_to(again, 1)
            # From the save, not from where the killed VM got to.
            first = counts(console(again))[0]
            assert before_save < first <= at_save + 1, (before_save, at_save, first)
            await driver.destroy_task(again.id, force=True)
        await assert_clean(kit, again)

    run(scenario)

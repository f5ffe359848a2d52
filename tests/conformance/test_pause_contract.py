"""Pause and resume (SIGSTOP / SIGCONT through SignalTask), every backend that declares it.

The fake and Cloud Hypervisor's fake VMM simulate a guest that cannot see the power button
while paused; QEMU runs the tiny guest for real. What QEMU's CPU time and the guest's output
do while paused is measured through the real plugin in tests/integration/test_pause.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from nomad_vm.driver.types import TaskState
from nomad_vm.errors import Unsupported
from tests.conformance import test_hypervisor_contract as contract
from tests.conformance.kits import Kit
from tests.conformance.test_hypervisor_contract import (
    assert_clean,
    run,
    stop_and_destroy,
    watching,
)
from tests.fakes import hypervisor as fake

# The contract's fixture: each backend in turn, in a private root, nothing left afterwards.
kit = contract.kit


def test_sigstop_pauses_sigcont_resumes_and_a_stop_resumes_first(kit: Kit) -> None:
    if not kit.capabilities.pause:
        pytest.skip(f"{kit.name} does not pause")

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("pause")
        async with watching(driver) as events:
            await driver.start_task(task)
            await kit.booted(task)
            vm = driver._tasks[task.id].vm
            assert vm is not None
            await driver.signal_task(task.id, "SIGSTOP")
            await events.wait_for("VM paused")
            assert await vm.is_paused()
            await driver.signal_task(task.id, "STOP")  # idempotent, and Nomad's short name
            await events.wait_for("VM is already paused")
            # Nothing runs in a paused guest: an exec is refused at once, saying why.
            with pytest.raises(Unsupported, match="the VM is paused"):
                await driver.exec_task(task.id, ["true"], 5)
            await driver.signal_task(task.id, "SIGCONT")
            await events.wait_for("VM resumed")
            assert not await vm.is_paused()
            await driver.signal_task(task.id, "SIGSTOP")
            # A stop of a paused VM: resumed first, the guest sees the button and powers off.
            await driver.stop_task(task.id, 20, "SIGTERM")
            result = await driver.wait_task(task.id)
            await events.wait_for("Guest powered off")
        await driver.destroy_task(task.id, force=False)
        assert (result.exit_code, result.signal, result.err) == (0, 0, "")
        assert events.has("VM resumed to be stopped") and not events.has("terminated")
        await assert_clean(kit, task)

    run(scenario)


def test_a_paused_vm_stays_paused_across_a_plugin_restart(kit: Kit) -> None:
    if not kit.capabilities.pause:
        pytest.skip(f"{kit.name} does not pause")

    async def scenario() -> None:
        first = kit.driver()
        task = kit.task("held")
        handle, _ = await first.start_task(task)
        await kit.booted(task)
        await first.signal_task(task.id, "SIGSTOP")
        await first.shutdown()
        second = kit.driver()
        async with watching(second) as events:
            await second.recover_task(task, handle)
            await events.wait_for("VM is paused (found so after the plugin restarted")
            # Neither a guest verdict nor an end: QEMU's "paused" is not "shutdown".
            assert (await second.inspect_task(task.id)).state == TaskState.RUNNING
            vm = second._tasks[task.id].vm
            assert vm is not None and await vm.is_paused()
            await second.signal_task(task.id, "SIGCONT")
            await events.wait_for("VM resumed")
            assert (await second.inspect_task(task.id)).state == TaskState.RUNNING
            await stop_and_destroy(second, task)
        await assert_clean(kit, task)

    run(scenario)


def test_a_backend_without_pause_refuses_sigstop_naming_itself(kit: Kit) -> None:
    if kit.name != fake.NAME:
        pytest.skip("the driver's refusal is the same for every backend")

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("nopause")
        await driver.start_task(task)
        entry = driver._tasks[task.id]
        entry.capabilities = replace(entry.capabilities, pause=False)
        with pytest.raises(Unsupported, match=f"the {entry.journal.backend} backend cannot"):
            await driver.signal_task(task.id, "SIGSTOP")
        await driver.destroy_task(task.id, force=True)
        await assert_clean(kit, task)

    run(scenario)


def test_describe_says_what_the_vmm_runs(kit: Kit) -> None:
    if kit.name == fake.NAME:
        pytest.skip("the fake has no VMM to ask")

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("described", options={"image": kit.every_step()["image"]})
        await driver.start_task(task)
        await kit.booted(task)
        vm = driver._tasks[task.id].vm
        assert vm is not None
        described = await vm.describe()
        assert described.vcpus == 1 and described.memory_bytes == 160 * 2**20, described
        assert described.plugged_memory_bytes == 0
        runtime_dir = driver._tasks[task.id].journal.runtime_dir
        # The task's own disk, in its runtime dir, over the job's image.
        assert any(d.file.startswith(runtime_dir) for d in described.disks), described.disks
        await stop_and_destroy(driver, task)
        await assert_clean(kit, task)

    run(scenario)

"""One contract, every backend: QEMU (real, TCG, the tiny guest) and the in-process fake.

The driver (``VMDriver``, in this process) is driven as the plugin layer drives it, with the
backend from a registry; nothing here knows which backend runs. It covers: start, wait and
stop honouring kill_timeout (power button, then terminate); exit verdicts; recovery of each
state a journal can be in; and that a failure injected at every StartTask step, or a fresh
plugin destroying what a start paused at any step left, leaves no process, directory or file.
Crashes of the real plugin process at each step are in tests/integration/test_crash_safety.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from nomad_vm import schema
from nomad_vm.driver.checkpoints import START_STEPS
from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal import RecordedProcess, TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.task import TERM_GRACE
from nomad_vm.driver.types import TaskConfig, TaskHandle, TaskState
from nomad_vm.errors import HypervisorError
from nomad_vm.processes import ProcessIdentity, identity_of, is_same_process
from nomad_vm.vm.cgroups import cgroup_name
from nomad_vm.vm.hypervisor import VMM_ROLE
from nomad_vm.vm.process import GATE_SHELL
from nomad_vm.vm.registry import BUILT_IN, HypervisorRegistry
from tests.conformance.kits import (
    BOOTED,
    CH,
    CH_FAKE_VMM,
    RUNNING,
    RUNS,
    Behaviour,
    Kit,
    ch_unavailable,
)
from tests.conftest import task_cgroups, wait_until
from tests.fakes import hypervisor as fake

BACKENDS = [
    fake.NAME,
    CH_FAKE_VMM,
    pytest.param("qemu", marks=pytest.mark.integration),
    pytest.param(CH, marks=pytest.mark.integration),
]


@pytest.fixture(params=BACKENDS)
def kit(request: pytest.FixtureRequest, short_tmp: Path, tiny_guest: Any) -> Iterator[Kit]:
    if request.param == CH and (why := ch_unavailable()):
        pytest.skip(f"real Cloud Hypervisor cannot run here: {why}")
    kit = Kit(request.param, short_tmp, tiny_guest)
    yield kit
    assert not kit.processes(), f"processes outlived the test: {kit.processes()}"


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Events:
    """Every task event the driver emits, as they come."""

    messages: list[str] = field(default_factory=list)

    def has(self, text: str) -> bool:
        return any(text in m for m in self.messages)

    async def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.has(text):
            if time.monotonic() > deadline:
                raise AssertionError(f"no event with {text!r}: {self.messages}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def watching(driver: VMDriver) -> AsyncIterator[Events]:
    events = Events()

    async def pump() -> None:
        async for event in driver.task_events():
            events.messages.append(event.message)

    task = asyncio.create_task(pump())
    try:
        yield events
    finally:
        task.cancel()


def run(coroutine: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(
        asyncio.wait_for(
            coroutine(), float(os.environ.get("NOMAD_VM_TEST_SCENARIO_TIMEOUT", "600"))
        )
    )


def journal_of(kit: Kit, task: TaskConfig) -> TaskJournal:
    journal = JournalStore(kit.data_dir).load(task.id)
    assert journal is not None
    return journal


async def assert_clean(kit: Kit, task: TaskConfig) -> None:
    """No process, journal, runtime directory or other plugin file is left for the task."""
    deadline = time.monotonic() + 10
    while kit.processes() and time.monotonic() < deadline:  # SIGKILLed: gone in a moment
        await asyncio.sleep(0.05)
    assert kit.processes() == []
    assert kit.files(task) == []
    name = cgroup_name(task.id, str(kit.data_dir))
    assert [p for p in task_cgroups() if p.name == name] == []


async def ended(ident: ProcessIdentity) -> None:
    deadline = time.monotonic() + 10
    while is_same_process(ident):
        assert time.monotonic() < deadline, f"{ident} did not end"
        await asyncio.sleep(0.01)


async def stop_and_destroy(driver: VMDriver, task: TaskConfig, timeout: float = 20.0) -> None:
    await driver.stop_task(task.id, timeout, "SIGTERM")
    await driver.wait_task(task.id)
    await driver.destroy_task(task.id, force=True)


# -- start, wait, stop -------------------------------------------------------------------


def test_stop_presses_the_power_button_and_the_guest_powers_off(kit: Kit) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("acpi")
        async with watching(driver) as events:
            handle, _ = await driver.start_task(task)
            assert handle.state == TaskState.RUNNING
            await kit.booted(task)
            async for sample in driver.task_stats(task.id, 0.1):
                assert sample.memory.rss > 0
                break
            started = time.monotonic()
            await driver.stop_task(task.id, 20, "SIGTERM")
            result = await driver.wait_task(task.id)
            elapsed = time.monotonic() - started
            await events.wait_for("Guest powered off")
        await driver.destroy_task(task.id, force=False)
        assert (result.exit_code, result.signal, result.err) == (0, 0, "")
        assert elapsed < 15, elapsed
        assert events.has("ACPI shutdown requested") and not events.has("terminated")
        await assert_clean(kit, task)

    run(scenario)


def test_stop_terminates_a_guest_that_ignores_the_button_at_kill_timeout(kit: Kit) -> None:
    kill_timeout = 0.3 if kit.name == fake.NAME else 3.0

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("deaf", Behaviour(ignores_acpi=True))
        async with watching(driver) as events:
            await driver.start_task(task)
            await kit.booted(task)
            started = time.monotonic()
            await driver.stop_task(task.id, kill_timeout, "SIGTERM")
            result = await driver.wait_task(task.id)
            elapsed = time.monotonic() - started
        await driver.destroy_task(task.id, force=False)
        assert kill_timeout <= elapsed < kill_timeout + TERM_GRACE + 1, elapsed
        assert result.signal != 0 and result.err == "", result  # our stop, not a crash
        assert events.has(f"did not stop within {kill_timeout:g}s, VM terminated")
        await assert_clean(kit, task)

    run(scenario)


def test_destroy_refuses_a_running_task_without_force(kit: Kit) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("force")
        await driver.start_task(task)
        with pytest.raises(HypervisorError, match="still running"):
            await driver.destroy_task(task.id, force=False)
        assert (await driver.inspect_task(task.id)).state == TaskState.RUNNING
        await driver.destroy_task(task.id, force=True)
        await assert_clean(kit, task)

    run(scenario)


# -- exit verdicts -------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["poweroff", "panic"])
def test_what_the_guest_does_is_the_exit_verdict(kit: Kit, then: str) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task(then, Behaviour(then=then))
        async with watching(driver) as events:
            await driver.start_task(task)
            result = await driver.wait_task(task.id)
            await events.wait_for("Guest powered off" if then == "poweroff" else "panicked")
        await driver.destroy_task(task.id, force=False)
        if then == "poweroff":
            assert (result.exit_code, result.err) == (0, "")
        else:
            assert result.exit_code != 0 and "panicked" in result.err
        await assert_clean(kit, task)

    run(scenario)


def test_a_killed_vmm_is_a_failure_naming_the_signal(kit: Kit) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("killed")
        await driver.start_task(task)
        vmm = journal_of(kit, task).vmm
        assert vmm is not None
        os.kill(vmm.pid, signal.SIGKILL)
        result = await driver.wait_task(task.id)
        await driver.destroy_task(task.id, force=False)
        assert (result.exit_code, result.signal) == (137, signal.SIGKILL)
        assert "SIGKILL" in result.err
        await assert_clean(kit, task)

    run(scenario)


def test_a_reboot_keeps_the_same_vm_running(kit: Kit) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("reboot", Behaviour(then="reboot"))
        async with watching(driver) as events:
            await driver.start_task(task)
            vmm = journal_of(kit, task).vmm
            await events.wait_for("Guest rebooted")
            status = await driver.inspect_task(task.id)
            assert status.state == TaskState.RUNNING
            assert identity_of(vmm.pid if vmm else 0) == vmm
            await stop_and_destroy(driver, task, timeout=2)
        await assert_clean(kit, task)

    run(scenario)


# -- recovery: every state a journal can be in --------------------------------------------


def handle_of(journal: TaskJournal) -> TaskHandle:
    return TaskHandle(1, TaskState.RUNNING, journal.encode())


@asynccontextmanager
async def restarted(
    kit: Kit, task: TaskConfig, behaviour: Behaviour = RUNS
) -> AsyncIterator[tuple[VMDriver, TaskHandle]]:
    """Start ``task`` in one plugin, then let that plugin go (its VM keeps running): yields a
    fresh plugin and the handle Nomad kept."""
    first = kit.driver()
    handle, _ = await first.start_task(task)
    await kit.booted(task, BOOTED if behaviour.then else RUNNING)
    await first.shutdown()
    yield kit.driver(), handle


def test_recover_a_running_vm_without_booting_it_twice(kit: Kit) -> None:
    async def scenario() -> None:
        task = kit.task("alive")
        async with restarted(kit, task) as (second, handle):
            vmm = journal_of(kit, task).vmm
            launches = kit.host.launches
            await second.recover_task(task, handle)
            await second.recover_task(task, handle)  # idempotent
            assert (await second.inspect_task(task.id)).state == TaskState.RUNNING
            assert identity_of(vmm.pid if vmm else 0) == vmm, "the same VMM process"
            assert kit.host.launches == launches
            assert kit.boots(task) in (None, 1), "the guest booted again"
            assert len(kit.processes()) >= 1
            await stop_and_destroy(second, task)
        await assert_clean(kit, task)

    run(scenario)


@pytest.mark.parametrize("then", ["poweroff", "panic"])
def test_recover_what_the_guest_did_while_the_plugin_was_away(kit: Kit, then: str) -> None:
    async def scenario() -> None:
        behaviour = Behaviour(then=then, later=True)
        task = kit.task(f"away{then}", behaviour)
        async with restarted(kit, task, behaviour) as (second, handle):
            await kit.acted_while_away(journal_of(kit, task))
            await second.recover_task(task, handle)
            result = await second.wait_task(task.id)
            await second.destroy_task(task.id, force=False)
        if not kit.capabilities.verdict_survives_plugin_absence:
            assert result.exit_code != 0 and "not running" in result.err
        elif then == "poweroff":
            assert (result.exit_code, result.err) == (0, ""), result
        else:
            assert result.exit_code != 0 and "panicked" in result.err, result
        await assert_clean(kit, task)

    run(scenario)


def test_recover_a_vm_killed_while_the_plugin_was_away(kit: Kit) -> None:
    async def scenario() -> None:
        task = kit.task("gone")
        async with restarted(kit, task) as (second, handle):
            journal = journal_of(kit, task)
            assert journal.vmm is not None
            os.kill(journal.vmm.pid, signal.SIGKILL)
            await ended(journal.vmm)
            await second.recover_task(task, handle)
            result = await second.wait_task(task.id)
            await second.destroy_task(task.id, force=False)
        assert result.exit_code != 0 and "not running" in result.err, result
        await assert_clean(kit, task)

    run(scenario)


def test_recover_from_nomads_handle_when_the_journal_file_is_lost(kit: Kit) -> None:
    async def scenario() -> None:
        task = kit.task("handle")
        async with restarted(kit, task) as (second, handle):
            store = JournalStore(kit.data_dir)
            store.path_for(task.id).unlink()
            await second.recover_task(task, handle)
            assert store.load(task.id) == TaskJournal.decode(handle.driver_state)
            await stop_and_destroy(second, task)
        await assert_clean(kit, task)

    run(scenario)


def test_a_recycled_pid_is_never_taken_for_the_vm_nor_killed(kit: Kit) -> None:
    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("recycled")
        other = subprocess.Popen(["sleep", "60"])
        try:
            now = identity_of(other.pid)
            assert now is not None
            # The VM's pid, now another process's: same pid, other start ticks.
            vmm = replace(now, start_ticks=now.start_ticks - 1)
            runtime_dir = Path(task.task_dir) / "nomad-vm-recycled"
            journal = TaskJournal(
                task.id,
                kit.registry().default_name,
                time.time(),
                runtime_dir=str(runtime_dir),
                processes=(RecordedProcess(VMM_ROLE, vmm),),
                control_socket=str(runtime_dir / "control.sock"),
            )
            await driver.recover_task(task, handle_of(journal))
            result = await driver.wait_task(task.id)
            assert result.exit_code != 0 and "not running" in result.err
            await driver.destroy_task(task.id, force=False)
            assert other.poll() is None, "the unrelated process must not be touched"
        finally:
            other.kill()
            other.wait()
        await assert_clean(kit, task)

    run(scenario)


# -- failures and crashes at every StartTask step ----------------------------------------


class InjectedFailure(HypervisorError):
    """The failure a test injects at a StartTask step."""


@dataclass
class FailAt:
    step: str
    seen: list[str] = field(default_factory=list)

    async def reached(self, step: str, task_id: str) -> None:
        self.seen.append(step)
        if step == self.step:
            raise InjectedFailure(f"injected at {step}")


@dataclass
class PauseAt:
    """The in-process stand-in for a plugin that stops at a step (the test gives up on it)."""

    step: str
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    async def reached(self, step: str, task_id: str) -> None:
        if step == self.step:
            self.paused.set()
            await asyncio.Event().wait()


# Steps the every-step task takes with every backend (no network here: see test_crash_safety).
OFFLINE_STEPS = [s for s in START_STEPS if s != "network"]


@pytest.mark.parametrize("step", OFFLINE_STEPS)
def test_a_failure_at_each_start_step_leaves_nothing(kit: Kit, step: str) -> None:
    if step not in kit.start_steps:
        pytest.skip(f"{kit.name} has no {step} step")

    async def scenario() -> None:
        fail = FailAt(step)
        driver = kit.driver(checkpoints=fail)
        task = kit.task(f"f{OFFLINE_STEPS.index(step)}", options=kit.every_step())
        with pytest.raises(InjectedFailure):
            await driver.start_task(task)
        assert step in fail.seen, f"the start never reached {step}: {fail.seen}"
        await assert_clean(kit, task)
        with pytest.raises(Exception, match="task not found"):
            await driver.wait_task(task.id)
        # The same task starts fine afterwards: nothing in the way.
        again = kit.driver()
        await again.start_task(task)
        await again.destroy_task(task.id, force=True)
        await assert_clean(kit, task)

    run(scenario)


@pytest.mark.parametrize("step", OFFLINE_STEPS)
def test_a_fresh_plugin_destroys_what_a_start_stopped_at_each_step_left(
    kit: Kit, step: str
) -> None:
    """Nomad never got an answer, so it only calls DestroyTask with the task id."""
    if step not in kit.start_steps:
        pytest.skip(f"{kit.name} has no {step} step")

    async def scenario() -> None:
        pause = PauseAt(step)
        first = kit.driver(checkpoints=pause)
        task = kit.task(f"p{OFFLINE_STEPS.index(step)}", options=kit.every_step())
        starting = asyncio.create_task(first.start_task(task))
        await asyncio.wait_for(pause.paused.wait(), 120)
        fresh = kit.driver()
        await fresh.destroy_task(task.id, force=False)
        if step in ("helpers-spawned", "vmm-spawned"):
            # Forked but not yet recorded: they wait at their gate, where their program never
            # runs, and end by themselves when the plugin's end of the gate closes (a real
            # crash: test_crash_safety). Here that end is still open in this process.
            # What the replay killed may take a moment to be gone: virtiofsd's sandboxed child
            # (root runs it with --sandbox=namespace) dies after its SIGKILLed parent.
            assert wait_until(lambda: only_gates(kit), 10.0), kit.processes()
        else:
            await assert_clean(kit, task)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await assert_clean(kit, task)

    run(scenario)


def only_gates(kit: Kit) -> bool:
    """Some processes are left, and all of them wait at their gates."""
    try:
        waiting = [p.cmdline()[0] for p in kit.live_processes()]
    except psutil.Error:  # one ended while we looked
        return False
    return bool(waiting) and all(program == GATE_SHELL for program in waiting)


# -- what a backend declares -----------------------------------------------------------------


def test_capabilities_only_name_values_the_config_allows(kit: Kit) -> None:
    caps = kit.capabilities
    allowed = {
        "accelerators": schema.ACCELERATORS,
        "firmware_kinds": schema.FIRMWARES,
        "machine_types": schema.MACHINES,
        "share_transports": schema.SHARE_TRANSPORTS,
        "arches": schema.TASK_CONFIG.field("os").fields[0].choices,
    }
    for name, values in allowed.items():
        assert set(getattr(caps, name)) <= set(values), name


# QEMU runs every machine type the config allows, so only the fake has one to refuse; the check
# itself is the driver's, the same for every backend.
@pytest.mark.parametrize("kit", [fake.NAME], indirect=True)
def test_what_the_backend_cannot_do_is_refused_naming_the_option(kit: Kit) -> None:
    caps = kit.capabilities
    missing = [m for m in schema.MACHINES if m not in caps.machine_types]
    assert missing, f"{kit.name} declares every machine type: nothing to refuse"

    async def scenario() -> None:
        driver = kit.driver()
        task = kit.task("refused", options={"os": {"arch": "x86_64", "machine": missing[0]}})
        with pytest.raises(Exception) as err:
            await driver.start_task(task)
        assert getattr(err.value, "field", "") == "config.os.machine", err.value
        await assert_clean(kit, task)

    run(scenario)


def test_recovery_dispatches_on_the_backend_the_journal_names(
    short_tmp: Path, tiny_guest: Any
) -> None:
    """A plugin whose default backend is QEMU recovers a task its journal says runs on the fake
    (and would fail to find a QMP socket if it asked QEMU)."""
    kit = Kit(fake.NAME, short_tmp, tiny_guest)

    async def scenario() -> None:
        task = kit.task("dispatch")
        first = kit.driver()
        handle, _ = await first.start_task(task)
        await first.shutdown()
        both = {**BUILT_IN, fake.NAME: lambda: fake.FakeHypervisor(kit.host)}
        second = VMDriver(backends=HypervisorRegistry(both, default="qemu"))
        second.set_config({"data_dir": str(kit.data_dir)}, None)
        assert journal_of(kit, task).backend == fake.NAME
        await second.recover_task(task, handle)
        assert (await second.inspect_task(task.id)).state == TaskState.RUNNING
        # Only the fake can press its guest's power button (QEMU would find no QMP socket).
        await second.stop_task(task.id, 20, "SIGTERM")
        result = await second.wait_task(task.id)
        assert (result.exit_code, result.signal, result.err) == (0, 0, ""), result
        await second.destroy_task(task.id, force=False)
        await assert_clean(kit, task)

    run(scenario)

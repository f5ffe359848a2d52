"""One task's runtime: its VM, the events it reports, when it started and how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from nomad_vm.driver.agent_watch import watch_agent
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.memory_policy import DEFAULT_SETTINGS, MemoryPolicy, PolicySettings
from nomad_vm.driver.memory_watch import drive_memory
from nomad_vm.driver.types import ExitResult, TaskConfig, TaskState, TaskStatus
from nomad_vm.errors import NomadVMError
from nomad_vm.vm.capabilities import HypervisorCapabilities
from nomad_vm.vm.guest_agent import GuestAgent
from nomad_vm.vm.hypervisor import GuestEvent, GuestEventReport, HotplugMemory, RunningVM
from nomad_vm.vm.serial_console import SerialConsole
from nomad_vm.vm.spec import VMExit

log = logging.getLogger(__name__)

# After SIGTERM the VMM exits at once; SIGKILL follows if it has not within this many seconds.
TERM_GRACE = 5.0
# The ACPI power button is pressed again this often while the guest has not powered off: a
# Windows guest ignores a press while nobody is logged in (unless its policy says otherwise) or
# before it has finished booting, and a Linux guest before systemd-logind runs.
POWER_BUTTON_INTERVAL = 10.0
# How long an answering agent may take to accept guest-shutdown (it replies only on failure,
# after ``GuestAgent.shutdown``'s 2 s of silence).
AGENT_SHUTDOWN_TIMEOUT = 5.0


def exit_result_from(ended: VMExit, stopped_by_driver: bool) -> ExitResult:
    """Nomad's view of a VM's end. Guest power-off is the one success."""
    if ended.clean:
        return ExitResult(exit_code=0)
    if ended.panicked:
        return ExitResult(exit_code=1, err=ended.reason)
    if ended.signal:
        # A signal the driver sent while stopping the task is the expected end, not a crash.
        err = "" if stopped_by_driver else ended.reason
        return ExitResult(exit_code=128 + ended.signal, signal=ended.signal, err=err)
    if ended.code is None:
        return ExitResult(exit_code=1, err=ended.reason)
    return ExitResult(exit_code=ended.code, err=ended.reason)


def describe_event(report: GuestEventReport) -> str:
    """The task event text for what the guest did."""
    if report.event is GuestEvent.REBOOTED:
        return "Guest rebooted (the VM keeps running in place)"
    if report.event is GuestEvent.POWERED_OFF:
        return f"Guest powered off ({report.detail or 'guest-shutdown'})"
    return "Guest kernel panicked"


class VMTask:
    def __init__(
        self,
        config: TaskConfig,
        vm: RunningVM | None,
        journal: TaskJournal,
        events: EventBus,
        capabilities: HypervisorCapabilities,
    ) -> None:
        self.config = config
        self.vm = vm
        self.journal = journal
        self.capabilities = capabilities
        self.started_at = datetime.fromtimestamp(journal.started_at, UTC)
        self.completed_at: datetime | None = None
        self.result: ExitResult | None = None
        self.stopping = False
        self._events = events
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The guest agent client once it has answered (exec and signals go through it).
        self.agent: GuestAgent | None = None
        # The serial console's connection while sessions are attached (console_session).
        self.console: SerialConsole | None = None
        # The VM's per-device I/O counters as last read with its stats (Nomad's TaskStats
        # has no field for them: InspectTask shows them as io.<device>.<counter>).
        self.device_io: Mapping[str, Mapping[str, int]] = {}
        # The VM's hot-pluggable memory as last read (memory_watch); None: it has none.
        self.hotplug: HotplugMemory | None = None

    def start_watching(self, memory_policy: PolicySettings = DEFAULT_SETTINGS) -> None:
        assert self.vm is not None
        self._tasks.append(asyncio.create_task(self._watch(), name=f"wait {self.config.id}"))
        self._tasks.append(asyncio.create_task(self._follow(self.vm), name="guest events"))
        if self.capabilities.memory_hotplug:
            memory = drive_memory(
                self.vm,
                self.config.resources.memory_mb,
                self.emit,
                self._hotplug_seen,
                MemoryPolicy(memory_policy),
            )
            self._tasks.append(asyncio.create_task(memory, name="hot-pluggable memory"))
        agent = self.vm.guest_agent()
        if agent is not None:
            watcher = watch_agent(agent, self._agent_ready)
            self._tasks.append(asyncio.create_task(watcher, name="guest agent"))

    def _agent_ready(self, agent: GuestAgent, after: float) -> None:
        self.agent = agent
        self._events.emit(self.config, f"Guest agent answered ({after:.0f}s after the VM started)")

    def _hotplug_seen(self, hot: HotplugMemory) -> None:
        self.hotplug = hot

    def emit(self, message: str) -> None:
        self._events.emit(self.config, message)

    async def _follow(self, vm: RunningVM) -> None:
        async for report in vm.guest_events():
            self._events.emit(self.config, describe_event(report))

    def mark_exited(self, result: ExitResult) -> None:
        """Record an exit found without watching (the VM died while the plugin was away)."""
        self._finish(result)

    async def _watch(self) -> None:
        assert self.vm is not None
        try:
            ended = await self.vm.wait()
        except Exception as exc:
            # Never leave the task "running" with nobody watching: Nomad would wait forever.
            log.exception("waiting for the VM failed")
            ended = VMExit(None, None, f"waiting for the VM failed: {exc}")
        result = exit_result_from(ended, self.stopping)
        self._finish(result)
        if not result.successful and not self.stopping:
            self._events.emit(self.config, f"VM ended: {result.err}")

    def _finish(self, result: ExitResult) -> None:
        self.result = result
        self.completed_at = datetime.now(UTC)
        self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    async def wait(self) -> ExitResult:
        await self._done.wait()
        assert self.result is not None
        return self.result

    async def _ended_within(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float) -> None:
        """Ask the guest to power off (its agent's guest-shutdown when the agent has
        answered, else the ACPI power button), press the button again every
        ``POWER_BUTTON_INTERVAL`` seconds (Windows ignores a press while nobody is logged
        in, or before it has finished booting), up to ``timeout``; then terminate."""
        if not self.running or self.vm is None:
            return
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        presses = 0
        if await self._agent_shutdown(timeout):
            self.emit(
                f"Shutdown requested through the guest agent (waiting up to {timeout:g}s; "
                f"the ACPI power button follows every {POWER_BUTTON_INTERVAL:g}s)"
            )
        elif await self.vm.power_down():
            presses = 1
            self.emit(f"ACPI shutdown requested (waiting up to {timeout:g}s)")
        else:
            self.emit("The VMM does not answer: terminating the VM")
            await self.vm.terminate(TERM_GRACE)
            await self.wait()
            return
        while (remaining := deadline - loop.time()) > 0:
            if await self._ended_within(min(POWER_BUTTON_INTERVAL, remaining)):
                return
            if loop.time() < deadline and await self.vm.power_down():
                presses += 1
                self.emit(
                    f"ACPI power button pressed again (press {presses}: the guest has not "
                    "powered off yet)"
                    if presses > 1
                    else "ACPI shutdown requested (press 1, after the guest agent's request)"
                )
        self.emit(f"Guest did not stop within {timeout:g}s, VM terminated")
        await self.vm.terminate(TERM_GRACE)
        await self.wait()

    async def _agent_shutdown(self, timeout: float) -> bool:
        """guest-shutdown through an agent that has answered; False when there is none or it
        refuses (the ACPI power button is then the way)."""
        if self.agent is None:
            return False
        try:
            await asyncio.wait_for(self.agent.shutdown(), min(AGENT_SHUTDOWN_TIMEOUT, timeout))
        except (NomadVMError, TimeoutError) as exc:
            log.info("guest-shutdown through the agent failed: %s", exc)
            return False
        return True

    async def kill(self) -> None:
        if self.running and self.vm is not None:
            self.stopping = True
            self.vm.kill()
            await self.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:  # already reported where it happened; closing regardless
                    log.exception("watcher of task %s failed", self.config.id)
        self._tasks.clear()
        if self.console is not None:
            await self.console.close()
            self.console = None
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.close()

    def _hotplug_attributes(self) -> dict[str, str]:
        """Hot-pluggable memory in InspectTask (Nomad's TaskStats has no field for a VM's
        memory size): what the guest holds now, what the driver asked, the most it may."""
        hot = self.hotplug
        if hot is None:
            return {}
        return {
            "memory.plugged_bytes": str(hot.plugged),
            "memory.requested_bytes": str(hot.requested),
            "memory.hotplug_region_bytes": str(hot.region),
        }

    def status(self) -> TaskStatus:
        vmm = self.journal.vmm
        return TaskStatus(
            id=self.config.id,
            name=self.config.name,
            state=TaskState.RUNNING if self.running else TaskState.EXITED,
            started_at=self.started_at,
            completed_at=self.completed_at,
            result=self.result,
            attributes={
                "pid": str(vmm.pid) if vmm is not None else "",
                "control_socket": self.journal.control_socket,
                **self._hotplug_attributes(),
                **{
                    f"io.{device}.{name}": str(value)
                    for device, counters in sorted(self.device_io.items())
                    for name, value in sorted(counters.items())
                },
            },
        )

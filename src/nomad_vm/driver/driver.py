"""VMDriver: Nomad's task-driver semantics for VMs, in domain types (no gRPC here).

The plugin layer calls exactly these methods (see ``nomad_vm.driver.port.DriverPort``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

from nomad_vm import schema
from nomad_vm.control.protocol import socket_path
from nomad_vm.driver.checkpoints import Checkpoints, checkpoints_from_environment
from nomad_vm.driver.config import PluginConfig, parse_plugin_config
from nomad_vm.driver.console_session import CONSOLE_COMMAND, is_console_command, run_console
from nomad_vm.driver.control_server import ControlService
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.fingerprint import fingerprint_async
from nomad_vm.driver.guest_exec import ExecOutcome, SignalTarget, StdinReader, exec_in_guest
from nomad_vm.driver.guest_terminal import OutputSink, TerminalInput, run_terminal
from nomad_vm.driver.image_fetch import ImageFetcher, gc_periodically
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.ksm import KsmOutcome, apply_ksm
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.driver.orphans import OrphanSweeper
from nomad_vm.driver.pause import deliver_signal, resume_before_stop
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.recovery import (
    reattach,
    recovered_journal,
    resume_recovered,
    superseded_starts,
)
from nomad_vm.driver.replay import undo_host_changes
from nomad_vm.driver.runtime_dir import remove_run_dir_if_empty, runtime_dir
from nomad_vm.driver.snapshot_seal import node_key
from nomad_vm.driver.snapshot_tasks import after_start, save_on_stop, with_restore
from nomad_vm.driver.snapshots import arm as arm_snapshots
from nomad_vm.driver.start_events import planned_events, started_events
from nomad_vm.driver.start_steps import run_start_steps
from nomad_vm.driver.startup import StartPlan, plan_start
from nomad_vm.driver.stats import CpuRate
from nomad_vm.driver.task import VMTask
from nomad_vm.driver.types import (
    AgentInfo,
    Capabilities,
    ExitResult,
    Fingerprint,
    NetworkOverride,
    TaskConfig,
    TaskEvent,
    TaskHandle,
    TaskState,
    TaskStats,
    TaskStatus,
)
from nomad_vm.errors import HypervisorError, TaskExists, TaskNotFound, Unsupported
from nomad_vm.fields import Schema
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.vm.hypervisor import Hypervisor
from nomad_vm.vm.registry import HypervisorRegistry

log = logging.getLogger(__name__)

HANDLE_VERSION = 1
# The Go drivers re-send their fingerprint every 30 s; Nomad also wants one at once.
FINGERPRINT_PERIOD = 30.0


class VMDriver:
    def __init__(
        self,
        backends: HypervisorRegistry | None = None,
        checkpoints: Checkpoints | None = None,
        control: bool = False,
    ) -> None:
        self.config: PluginConfig = parse_plugin_config(None)
        self.agent = AgentInfo()
        self.events = EventBus()
        self.backends = backends or HypervisorRegistry()
        # StartTask's test hook (nothing happens unless a test asks for it).
        self.checkpoints = checkpoints or checkpoints_from_environment()
        self._tasks: dict[str, VMTask] = {}
        # Ids of StartTasks under way (not in _tasks yet): the orphan sweep leaves them alone.
        self._starting: set[str] = set()
        self._orphans = OrphanSweeper(
            lambda: self.journals.all(), lambda: {*self._tasks, *self._starting}, self._undo_stale
        )
        self._config_changed = asyncio.Event()
        self._images: ImageFetcher | None = None
        self._images_gc: asyncio.Task[None] | None = None
        self._ksm = KsmOutcome()
        # The operator's control socket (`nomad-vm vm ...`): the plugin process serves one.
        self._control = ControlService(lambda: self._tasks, self._snapshot_key) if control else None

    # --- plugin configuration -------------------------------------------------------------

    def set_config(self, raw: Mapping[str, object] | None, agent: AgentInfo | None) -> None:
        """Validate and apply the plugin config (may be called several times)."""
        self.config = parse_plugin_config(raw)
        for warning in self.config.seed.warnings():
            log.warning("%s", warning)
        if agent is not None:
            self.agent = agent
        # ksmd's pace and start (a host without KSM is reported by the fingerprint).
        self._ksm = apply_ksm(self.config.ksm)
        if self._images is not None:
            # Downloads under way keep their store; new ones use the new config.
            if self._images.store.root == ImageStore(self.config.data_dir).root:
                self._images.policy = self.config.image_cache
            else:
                self._images = None
        self._config_changed.set()

    @property
    def images(self) -> ImageFetcher:
        """The node's image cache (images given by URL), its downloads and removal policy."""
        if self._images is None:
            self._images = ImageFetcher(ImageStore(self.config.data_dir), self.config.image_cache)
        return self._images

    def _snapshot_key(self) -> bytes:
        """The node's key sealing snapshots (``snapshot_seal``): only ours are resumed."""
        return node_key(self.config.data_dir)

    def task_config_schema(self) -> Schema:
        return schema.TASK_CONFIG

    def capabilities(self) -> Capabilities:
        return Capabilities(
            send_signals=True,
            exec=True,
            mount_configs_supported=True,
            network_isolation_modes=("host", "group"),
        )

    async def fingerprints(self) -> AsyncIterator[Fingerprint]:
        """First fingerprint at once, then every 30 s or when the config changes. (Nomad keeps
        this stream open as long as it uses the plugin: the image cache's periodic removal
        runs alongside it.)"""
        if self._images_gc is None or self._images_gc.done():
            self._images_gc = asyncio.ensure_future(gc_periodically(lambda: self.images))
        while True:
            await self._serve_control()
            await self._orphans.start()  # what earlier plugins left and Nomad forgot (orphans.py)
            self._config_changed.clear()
            default = self.backends.preferred(self.config.hypervisor)
            others = [self.backends.get(n) for n in self.backends.names if n != default.name]
            yield await fingerprint_async(self.config, default, others, self._ksm)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._config_changed.wait(), FINGERPRINT_PERIOD)

    # --- task lifecycle ---------------------------------------------------------------------

    def _task(self, task_id: str) -> VMTask:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(task_id) from None

    @property
    def journals(self) -> JournalStore:
        return JournalStore(self.config.data_dir, self.config.identity.journal_dir)

    def _networks(self) -> NetworkManager:
        identity = self.config.identity
        return NetworkManager(
            self.config.data_dir / identity.network_dir,
            nft_table=identity.nft_table,
        )

    async def start_task(self, task: TaskConfig) -> tuple[TaskHandle, NetworkOverride | None]:
        """Validate, then make each host change (journal first); a failure at any step undoes
        everything the journal recorded."""
        if task.id in self._tasks:
            raise TaskExists(task.id)
        await self._serve_control()
        self._starting.add(task.id)
        plan: StartPlan | None = None
        error: BaseException | None = None
        try:
            run_dir = runtime_dir(task, self.config.data_dir)
            plan = await plan_start(task, self.config, self.agent, run_dir, self.backends)
            plan = await with_restore(plan, self.events, self._snapshot_key)
            return await self._start_planned(task, plan, plan.backend)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._starting.discard(task.id)
            if plan is not None:
                # The VMM has its own copies by now (or there is none): the plugin serves many
                # tasks and keeps no descriptor of any task's files.
                plan.files.close()
                await after_start(plan, self.events, error)

    async def _start_planned(
        self, task: TaskConfig, plan: StartPlan, backend: Hypervisor
    ) -> tuple[TaskHandle, NetworkOverride | None]:
        for note in planned_events(plan, self.config, self._ksm):
            self.events.emit(task, note)
        # A start of this very id that a dead plugin left half done: undo it first.
        await self._undo_leftover(task.id)
        # And earlier starts of this task Nomad gave up on (a VM may still run for them).
        stale = superseded_starts(self.journals.all(), task, {*self._tasks, *self._starting})
        for journal in stale:
            self.events.emit(task, f"Stopping a VM an earlier start left ({journal.task_id})")
        await self._undo_stale(stale, f"superseded by {task.id}")
        journal = TaskJournal(
            task.id,
            backend.name,
            started_at=time.time(),
            signal_unit=plan.vm.signal_unit,
            signal_pidfile=plan.vm.signal_pidfile,
        )
        recorder = TaskRecorder(self.journals, journal, self.checkpoints)
        try:
            started = await run_start_steps(
                plan,
                backend,
                recorder,
                self._networks(),
                self.events,
                self.images,
                self.config.data_dir,
            )
        except BaseException:
            await self._undo_failed_start(recorder.journal)
            raise
        await asyncio.to_thread(arm_snapshots, plan)
        entry = VMTask(task, started.vm, recorder.journal, self.events, backend.capabilities)
        self._tasks[task.id] = entry
        entry.start_watching(self.config.memory_policy)
        for message, details in started_events(plan, started.vm, recorder.journal):
            self.events.emit(task, message, details or None)
        handle = TaskHandle(HANDLE_VERSION, TaskState.RUNNING, recorder.journal.encode())
        network = started.network
        return handle, network.override if network is not None else None

    async def _undo_failed_start(self, journal: TaskJournal) -> None:
        """The start failed (or was cancelled): undo what it did; its own error is the one to
        report, so a failed clean-up is logged (and the journal kept for DestroyTask)."""
        try:
            await self._undo(journal)
        except Exception:
            log.exception("undoing the failed start of %s", journal.task_id)

    async def _undo(self, journal: TaskJournal) -> None:
        """Replay the journal; it is removed only once everything it names is gone."""
        await undo_host_changes(
            journal, self._networks(), self.config.network, self.config.seed.ceph
        )
        self.journals.remove(journal.task_id)
        if journal.image_leases:
            self.images.schedule_gc()  # an image may have become unused
        remove_run_dir_if_empty(self.config.data_dir)

    async def _undo_leftover(self, task_id: str) -> bool:
        """Replay the journal of a task this plugin does not run (a plugin died during its
        StartTask, or before DestroyTask); False when there is none."""
        journal = self.journals.load(task_id)
        if journal is None:
            return False
        log.info("undoing what an earlier plugin left of task %s", task_id)
        await self._undo(journal)
        return True

    async def _undo_stale(self, stale: list[TaskJournal], why: str) -> None:
        for journal in stale:
            log.info("undoing %s: %s", journal.task_id, why)
            await self._undo_failed_start(journal)  # a failure is logged, the journal kept

    async def recover_task(self, task: TaskConfig, handle: TaskHandle) -> None:
        """Reattach to a VM started by an earlier plugin process; never boot a second one
        (``driver.recovery``)."""
        self._orphans.claim(task.id)
        if task.id in self._tasks:
            return
        await self._serve_control()
        journal = recovered_journal(self.journals, task.id, handle)
        backend = self.backends.get(journal.backend)
        entry = await reattach(task, journal, backend, self.events)
        self._tasks[task.id] = entry
        if entry.vm is not None:
            await resume_recovered(
                entry,
                self.journals,
                self._networks(),
                self.config.network,
                self.events,
                self.config.memory_policy,
            )

    async def wait_task(self, task_id: str) -> ExitResult:
        return await self._task(task_id).wait()

    async def stop_task(self, task_id: str, timeout: float, signal_name: str) -> None:
        """Graceful stop: ACPI power button (a paused VM resumed first, so that its guest sees
        it), then terminate after ``timeout`` (kill_timeout). A `snapshot_on_stop` task's VM is
        saved instead, then its VMM ended (``snapshot_tasks``).

        ``signal_name`` (the job's kill_signal) has no meaning for a whole VM and is ignored.
        """
        entry = self._tasks.get(task_id)
        if entry is None:
            return  # already gone: Nomad retries stops, and a stopped task is what it wants
        if await save_on_stop(entry, self._snapshot_key):
            return
        await resume_before_stop(entry)
        await entry.stop(timeout)

    async def destroy_task(self, task_id: str, force: bool) -> None:
        entry = self._tasks.get(task_id)
        if entry is None:
            # Unknown here: a plugin that died mid-start (or before DestroyTask) may have left
            # all of it behind, and only the journal knows.
            await self._undo_leftover(task_id)
            return
        if entry.running:
            if not force:
                raise HypervisorError(
                    f"task {task_id} is still running; stop it first or use force"
                )
            await entry.kill()
        await entry.close()
        del self._tasks[task_id]
        # Helpers (virtiofsd) end with the VMM by themselves; the replay ends any that did not.
        # If it fails, the journal stays, and DestroyTask again finds it by id.
        await self._undo(entry.journal)

    async def inspect_task(self, task_id: str) -> TaskStatus:
        return self._task(task_id).status()

    async def task_stats(self, task_id: str, interval: float) -> AsyncIterator[TaskStats]:
        entry = self._task(task_id)
        rate = CpuRate(self.agent.core_mhz or 1000)
        while entry.running and entry.vm is not None:
            try:
                usage = await asyncio.to_thread(entry.vm.usage)
            except HypervisorError:
                if not entry.running:
                    return
                raise
            entry.device_io = await entry.vm.device_io()
            yield rate.sample(task_id, usage, await entry.vm.guest_memory_used())
            await asyncio.sleep(max(interval, 0.1))

    async def task_events(self) -> AsyncIterator[TaskEvent]:
        async for event in self.events.subscribe():
            yield event

    async def signal_task(self, task_id: str, signal_name: str) -> None:
        entry = self._task(task_id)
        target = SignalTarget(entry.journal.signal_unit, entry.journal.signal_pidfile)
        await deliver_signal(entry, signal_name, target)

    async def exec_task(
        self, task_id: str, command: list[str], timeout: float, stdin: StdinReader | None = None
    ) -> ExecOutcome:
        entry = self._task(task_id)
        if is_console_command(command):
            # Script checks and other one-shot execs: the console is only for a session.
            raise Unsupported(
                f"{CONSOLE_COMMAND} attaches a `nomad alloc exec` session to the serial "
                "console; it is not a command to run"
            )
        return await exec_in_guest(entry, command, timeout, stdin)

    async def exec_terminal(
        self,
        task_id: str,
        command: list[str],
        inputs: AsyncIterator[TerminalInput],
        on_output: OutputSink,
    ) -> ExecOutcome:
        """An interactive session: a pty in the guest, or the reserved console command."""
        if is_console_command(command):
            return await run_console(self._task(task_id), command, inputs, on_output)
        return await run_terminal(self._task(task_id), command, inputs, on_output)

    async def _serve_control(self) -> None:
        if self._control is not None:
            identity = self.config.identity
            await self._control.ensure(socket_path(self.config.data_dir, identity.alias))

    async def shutdown(self) -> None:
        """The plugin is going away: VMs keep running (Nomad will recover them)."""
        if self._control is not None:
            await self._control.close()
        await self._orphans.close()
        for entry in self._tasks.values():
            await entry.close()
        if self._images_gc is not None:
            self._images_gc.cancel()
        if self._images is not None:
            await self._images.close()

"""VMDriver: Nomad's task-driver semantics for VMs, in domain types (no gRPC here).

The plugin layer calls exactly these methods (see ``nomad_vm.driver.port.DriverPort``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from nomad_vm import schema
from nomad_vm.driver.config import RUNTIME_PREFIX, PluginConfig, parse_plugin_config
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.fingerprint import fingerprint_async
from nomad_vm.driver.guest_exec import (
    ExecOutcome,
    SignalTarget,
    StdinReader,
    exec_in_guest,
    signal_guest,
)
from nomad_vm.driver.guest_terminal import OutputSink, TerminalInput, run_terminal
from nomad_vm.driver.network_plan import NetworkRecord, network_event
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.driver.output import open_task_output
from nomad_vm.driver.startup import (
    AGENT_SOCKET,
    build_spec,
    make_runtime_dir,
    plan_start,
    prepare_disk,
    prepare_firmware_vars,
    write_seed_iso,
)
from nomad_vm.driver.state import DriverState
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
from nomad_vm.errors import (
    ConfigError,
    HypervisorError,
    NetworkError,
    TaskExists,
    TaskNotFound,
)
from nomad_vm.fields import Schema
from nomad_vm.processes import ProcessIdentity
from nomad_vm.vm.process import kill_leftovers
from nomad_vm.vm.qemu.backend import QemuBackend

log = logging.getLogger(__name__)

HANDLE_VERSION = 1
# The Go drivers re-send their fingerprint every 30 s; Nomad also wants one at once.
FINGERPRINT_PERIOD = 30.0
# Unix socket paths are limited to 108 bytes; beyond this the runtime dir moves to data_dir.
MAX_SOCKET_PATH = 100


class VMDriver:
    def __init__(self) -> None:
        self.config: PluginConfig = parse_plugin_config(None)
        self.agent = AgentInfo()
        self.events = EventBus()
        self._tasks: dict[str, VMTask] = {}
        self._config_changed = asyncio.Event()

    # --- plugin configuration -------------------------------------------------------------

    def set_config(self, raw: Mapping[str, object] | None, agent: AgentInfo | None) -> None:
        """Validate and apply the plugin config (may be called several times)."""
        self.config = parse_plugin_config(raw)
        if agent is not None:
            self.agent = agent
        self._config_changed.set()

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
        """First fingerprint at once, then every 30 s or when the config changes."""
        while True:
            self._config_changed.clear()
            yield await fingerprint_async(self.config)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._config_changed.wait(), FINGERPRINT_PERIOD)

    # --- task lifecycle ---------------------------------------------------------------------

    def _task(self, task_id: str) -> VMTask:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(task_id) from None

    def _runtime_dir(self, task: TaskConfig) -> Path:
        """``<task dir>/nomad-vm-<start id>``: per start, so a restart never meets leftovers of an
        earlier one; under data_dir when the socket path would be too long for unix sockets."""
        start_id = re.sub(r"[^A-Za-z0-9]", "", task.id.rsplit("/", 1)[-1])[:12] or "x"
        preferred = Path(task.task_dir) / f"{RUNTIME_PREFIX}-{start_id}"
        if len(str(preferred / "qmp.sock")) <= MAX_SOCKET_PATH:
            return preferred
        digest = hashlib.sha256(task.id.encode()).hexdigest()[:16]
        return self.config.data_dir / "run" / digest

    async def start_task(self, task: TaskConfig) -> tuple[TaskHandle, NetworkOverride | None]:
        """Validate, then prepare and launch; a failure at any step undoes the earlier ones."""
        if task.id in self._tasks:
            raise TaskExists(task.id)
        plan = await plan_start(task, self.config, self.agent, self._runtime_dir(task))
        if plan.shares and plan.share_transport.fallback:
            self.events.emit(task, f"Shares use {plan.share_transport.reason}")
        async with contextlib.AsyncExitStack() as undo:
            make_runtime_dir(plan, undo)
            disk = await prepare_disk(plan, self.events)
            network = None
            tap_fd = None
            if plan.network is not None:
                network = await self._networks().setup(plan.network)
                undo.push_async_callback(
                    self._networks().teardown, network.record, plan.network.net
                )
                self.events.emit(task, network_event(network, plan.network, plan.seed is not None))
                tap_fd = await self._networks().open_tap(network.record)
                if tap_fd is not None:
                    undo.callback(_close_quietly, tap_fd)
            seed = write_seed_iso(plan, self.events, network)
            spec = build_spec(plan, disk, prepare_firmware_vars(plan), seed, network, tap_fd)
            console_fd = await open_task_output(task.stdout_path)
            try:
                backend = QemuBackend(plan.qemu, plan.share_transport.virtiofsd)
                vm = await backend.launch(spec, console_fd, plan.runtime_dir)
            finally:
                # QEMU holds its own copies of the FIFO and the TAP descriptor; ours must not
                # keep logmon's pipe (or the TAP) open.
                os.close(console_fd)
                if tap_fd is not None:
                    _close_quietly(tap_fd)
            state = DriverState(
                task_id=task.id,
                backend="qemu",
                pid=vm.identity.pid,
                process_start_time=vm.identity.start_time,
                control_socket=str(spec.control_socket),
                runtime_dir=str(plan.runtime_dir),
                started_at=time.time(),
                signal_unit=plan.vm.signal_unit,
                signal_pidfile=plan.vm.signal_pidfile,
                helper_processes=tuple((h.pid, h.start_time) for h in vm.helper_identities),
                network=network.record.to_dict() if network is not None else None,
            )
            undo.pop_all()
        entry = VMTask(task, vm, state, plan.runtime_dir, self.events)
        self._tasks[task.id] = entry
        entry.start_watching(spec.agent_socket)
        self.events.emit(
            task,
            f"VM started: {spec.vcpus} vCPU, {spec.memory_mb} MB, accelerator {spec.accelerator}",
            {"pid": str(state.pid), "accelerator_reason": plan.accel.reason},
        )
        handle = TaskHandle(HANDLE_VERSION, TaskState.RUNNING, state.encode())
        return handle, network.override if network is not None else None

    def _networks(self) -> NetworkManager:
        return NetworkManager(self.config.data_dir / "network")

    async def recover_task(self, task: TaskConfig, handle: TaskHandle) -> None:
        """Reattach to a VM started by an earlier plugin process; never boot a second one."""
        if task.id in self._tasks:
            return
        state = DriverState.decode(handle.driver_state)
        runtime_dir = Path(state.runtime_dir)
        ident = ProcessIdentity(state.pid, state.process_start_time)
        backend = QemuBackend(self.config.qemu_binary)
        try:
            vm = await backend.reattach(ident, Path(state.control_socket), runtime_dir)
        except HypervisorError as exc:
            entry = VMTask(task, None, state, runtime_dir, self.events)
            gone = f"VM ended while the plugin was not running: {exc}"
            entry.mark_exited(ExitResult(exit_code=1, err=gone))
            self._tasks[task.id] = entry
            return
        entry = VMTask(task, vm, state, runtime_dir, self.events)
        self._tasks[task.id] = entry
        if state.network is not None:
            record = NetworkRecord.from_dict(state.network)
            try:
                for repair in await self._networks().reconcile(record, self.config.network):
                    self.events.emit(task, f"Network reconciled: {repair}")
            except (NetworkError, ConfigError) as exc:
                log.warning("reconciling the network of %s failed: %s", task.id, exc)
        agent_socket = runtime_dir / AGENT_SOCKET
        entry.start_watching(agent_socket if agent_socket.exists() else None)
        self.events.emit(task, "Reattached to the running VM", {"pid": str(state.pid)})

    async def wait_task(self, task_id: str) -> ExitResult:
        return await self._task(task_id).wait()

    async def stop_task(self, task_id: str, timeout: float, signal_name: str) -> None:
        """Graceful stop: ACPI power button, then terminate after ``timeout`` (kill_timeout).

        ``signal_name`` (the job's kill_signal) has no meaning for a whole VM and is ignored.
        """
        entry = self._tasks.get(task_id)
        if entry is None:
            return  # already gone: Nomad retries stops, and a stopped task is what it wants
        await entry.stop(timeout)

    async def destroy_task(self, task_id: str, force: bool) -> None:
        entry = self._tasks.get(task_id)
        if entry is None:
            # Unknown here, but a plugin that died mid-start may have left its network behind.
            await self._networks().teardown_leftover(task_id, self.config.network)
            return
        if entry.running:
            if not force:
                raise HypervisorError(
                    f"task {task_id} is still running; stop it first or use force"
                )
            await entry.kill()
        # virtiofsd ends with QEMU by itself; this catches one that did not (or not yet).
        kill_leftovers([ProcessIdentity(pid, t) for pid, t in entry.state.helper_processes])
        await entry.close()
        if entry.state.network is not None:
            record = NetworkRecord.from_dict(entry.state.network)
            await self._networks().teardown(record, self.config.network)
        shutil.rmtree(entry.runtime_dir, ignore_errors=True)
        del self._tasks[task_id]

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
            yield rate.sample(task_id, usage, await entry.vm.guest_memory_used())
            await asyncio.sleep(max(interval, 0.1))

    async def task_events(self) -> AsyncIterator[TaskEvent]:
        async for event in self.events.subscribe():
            yield event

    async def signal_task(self, task_id: str, signal_name: str) -> None:
        entry = self._task(task_id)
        target = SignalTarget(entry.state.signal_unit, entry.state.signal_pidfile)
        await signal_guest(entry, signal_name, target)

    async def exec_task(
        self, task_id: str, command: list[str], timeout: float, stdin: StdinReader | None = None
    ) -> ExecOutcome:
        return await exec_in_guest(self._task(task_id), command, timeout, stdin)

    async def exec_terminal(
        self,
        task_id: str,
        command: list[str],
        inputs: AsyncIterator[TerminalInput],
        on_output: OutputSink,
    ) -> ExecOutcome:
        return await run_terminal(self._task(task_id), command, inputs, on_output)

    async def shutdown(self) -> None:
        """The plugin is going away: VMs keep running (Nomad will recover them)."""
        for entry in self._tasks.values():
            await entry.close()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)

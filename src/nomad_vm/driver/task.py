"""One task's runtime: its VM, when it started, and how it ended."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

from nomad_vm.driver.events import EventBus
from nomad_vm.driver.state import DriverState
from nomad_vm.driver.types import ExitResult, TaskConfig, TaskState, TaskStatus
from nomad_vm.vm.qemu.backend import QemuVM
from nomad_vm.vm.spec import VMExit


def exit_result_from(ended: VMExit, stopped_by_driver: bool) -> ExitResult:
    """Nomad's view of a VMM exit. Guest power-off (QEMU status 0) is the only success."""
    if ended.clean:
        return ExitResult(exit_code=0)
    if ended.signal:
        # A signal we sent while stopping the task is the expected end of a stop, not a crash.
        err = "" if stopped_by_driver else ended.reason
        return ExitResult(exit_code=128 + ended.signal, signal=ended.signal, err=err)
    if ended.code is None:
        return ExitResult(exit_code=1, err=ended.reason)
    return ExitResult(exit_code=ended.code, err=ended.reason)


class VMTask:
    def __init__(
        self,
        config: TaskConfig,
        vm: QemuVM | None,
        state: DriverState,
        runtime_dir: Path,
        events: EventBus,
    ) -> None:
        self.config = config
        self.vm = vm
        self.state = state
        self.runtime_dir = runtime_dir
        self.started_at = datetime.fromtimestamp(state.started_at, UTC)
        self.completed_at: datetime | None = None
        self.result: ExitResult | None = None
        self.stopping = False
        self._events = events
        self._done = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name=f"watch {self.config.id}")

    def mark_exited(self, result: ExitResult) -> None:
        """Record an exit found without watching (the VM died while the plugin was away)."""
        self._finish(result)

    async def _watch(self) -> None:
        assert self.vm is not None
        ended = await self.vm.wait()
        result = exit_result_from(ended, self.stopping)
        self._finish(result)
        if result.successful:
            self._events.emit(self.config, "VM powered off")
        elif not self.stopping:
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

    async def stop(self, grace: float, signal_name: str) -> None:
        """Stop the VM: a forceful stop for now (SIGTERM, SIGKILL after ``grace``)."""
        if not self.running or self.vm is None:
            return
        self.stopping = True
        self._events.emit(
            self.config,
            f"Stopping VM (QEMU gets SIGTERM, SIGKILL after {grace:.0f}s)",
            {"kill_signal": signal_name or "SIGTERM"},
        )
        await self.vm.stop(grace)
        await self.wait()

    async def kill(self) -> None:
        if self.running and self.vm is not None:
            self.stopping = True
            self.vm.process.send_signal(signal.SIGKILL)
            await self.wait()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.vm is not None:
            self.vm.close()

    def status(self) -> TaskStatus:
        return TaskStatus(
            id=self.config.id,
            name=self.config.name,
            state=TaskState.RUNNING if self.running else TaskState.EXITED,
            started_at=self.started_at,
            completed_at=self.completed_at,
            result=self.result,
            attributes={"pid": str(self.state.pid), "control_socket": self.state.control_socket},
        )

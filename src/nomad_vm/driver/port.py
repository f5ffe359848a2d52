"""DriverPort: the one interface the plugin layer calls. ``VMDriver`` implements it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Protocol

from nomad_vm.driver.types import (
    AgentInfo,
    Capabilities,
    ExitResult,
    Fingerprint,
    NetworkOverride,
    TaskConfig,
    TaskEvent,
    TaskHandle,
    TaskStats,
    TaskStatus,
)
from nomad_vm.fields import Schema

if TYPE_CHECKING:
    from nomad_vm.driver.guest_exec import ExecOutcome, StdinReader
    from nomad_vm.driver.guest_terminal import OutputSink, TerminalInput


class DriverPort(Protocol):
    def set_config(self, raw: Mapping[str, object] | None, agent: AgentInfo | None) -> None: ...

    def task_config_schema(self) -> Schema: ...

    def capabilities(self) -> Capabilities: ...

    def fingerprints(self) -> AsyncIterator[Fingerprint]: ...

    async def start_task(self, task: TaskConfig) -> tuple[TaskHandle, NetworkOverride | None]: ...

    async def recover_task(self, task: TaskConfig, handle: TaskHandle) -> None: ...

    async def wait_task(self, task_id: str) -> ExitResult: ...

    async def stop_task(self, task_id: str, timeout: float, signal_name: str) -> None: ...

    async def destroy_task(self, task_id: str, force: bool) -> None: ...

    async def inspect_task(self, task_id: str) -> TaskStatus: ...

    def task_stats(self, task_id: str, interval: float) -> AsyncIterator[TaskStats]: ...

    def task_events(self) -> AsyncIterator[TaskEvent]: ...

    async def signal_task(self, task_id: str, signal_name: str) -> None: ...

    async def exec_task(
        self, task_id: str, command: list[str], timeout: float, stdin: StdinReader | None = None
    ) -> ExecOutcome: ...

    async def exec_terminal(
        self,
        task_id: str,
        command: list[str],
        inputs: AsyncIterator[TerminalInput],
        on_output: OutputSink,
    ) -> ExecOutcome: ...

    async def shutdown(self) -> None: ...

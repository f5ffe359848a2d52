"""QEMU's run states: a user's pause ("paused") is never a guest's end ("shutdown",
"guest-panicked", which -action shutdown=pause,panic=pause also leaves stopped), and a guest
that ended is never resumed. A recording stand-in for the QMP connection (fault injection)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.process import SupervisedProcess
from nomad_vm.vm.qemu.monitor import QemuMonitor
from nomad_vm.vm.qemu.running import QemuVM


class RecordingMonitor:
    def __init__(self, status: str) -> None:
        self.run_state = status
        self.commands: list[str] = []

    async def status(self) -> str:
        return self.run_state

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        self.commands.append(command)
        return {}


def vm_with(status: str) -> tuple[QemuVM, RecordingMonitor]:
    monitor = RecordingMonitor(status)
    process = cast(SupervisedProcess, object())
    return QemuVM(process, cast(QemuMonitor, monitor), Path("/nonexistent")), monitor


@pytest.mark.parametrize(
    ("status", "paused"),
    [("paused", True), ("running", False), ("shutdown", False), ("guest-panicked", False)],
)
def test_only_the_paused_run_state_is_a_pause(status: str, paused: bool) -> None:
    vm, _ = vm_with(status)
    assert asyncio.run(vm.is_paused()) is paused


def test_a_paused_vm_found_after_a_restart_is_no_verdict_and_is_not_quit() -> None:
    vm, monitor = vm_with("paused")
    asyncio.run(vm.check_finished_meanwhile())
    assert vm.guest_verdict() is None and monitor.commands == []


@pytest.mark.parametrize(
    ("status", "verdict"), [("shutdown", "poweroff"), ("guest-panicked", "panic")]
)
def test_a_guest_end_found_after_a_restart_is_its_verdict(status: str, verdict: str) -> None:
    vm, monitor = vm_with(status)
    asyncio.run(vm.check_finished_meanwhile())
    assert vm.guest_verdict() == verdict and monitor.commands == ["quit"]


def test_pause_and_resume_are_stop_and_cont_and_an_ended_guest_is_not_resumed() -> None:
    vm, monitor = vm_with("running")
    asyncio.run(vm.pause())
    asyncio.run(vm.resume())
    assert monitor.commands == ["stop", "cont"]
    vm.guest_end = "poweroff"
    with pytest.raises(HypervisorError, match="the guest has ended"):
        asyncio.run(vm.resume())
    assert monitor.commands == ["stop", "cont"]


def test_without_qmp_pause_says_why() -> None:
    vm = QemuVM(cast(SupervisedProcess, object()), None, Path("/nonexistent"))
    with pytest.raises(HypervisorError, match="QMP is unavailable"):
        asyncio.run(vm.pause())
    assert asyncio.run(vm.is_paused()) is False

"""VM lifecycle through the real plugin process: graceful stop, exit kinds, reboot in place."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import drv, tiny_task

RUNNING = b"nomad-vm tiny guest: running"


def collect_events(plugin: PluginProcess) -> tuple[grpc.Future, list[str]]:  # type: ignore[type-arg]
    """Start a TaskEvents stream whose messages accumulate in the returned list."""
    import threading

    stream = drv(plugin).TaskEvents(driver_pb2.TaskEventsRequest())
    messages: list[str] = []

    def pump() -> None:
        try:
            for event in stream:
                messages.append(event.message)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return stream, messages


def wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def stop(plugin: PluginProcess, task_id: str, seconds: int) -> float:
    started = time.monotonic()
    drv(plugin).StopTask(
        driver_pb2.StopTaskRequest(task_id=task_id, timeout=duration_pb2.Duration(seconds=seconds))
    )
    return time.monotonic() - started


def wait(plugin: PluginProcess, task_id: str, timeout: float = 60) -> driver_pb2.WaitTaskResponse:
    return drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=task_id), timeout=timeout)


def destroy(plugin: PluginProcess, task_id: str) -> None:
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task_id, force=True))


def test_acpi_stop_powers_the_guest_off(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="acpi") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        elapsed = stop(plugin, cfg.id, 20)
        result = wait(plugin, cfg.id)
        assert fifo.wait_for(b"power button pressed", 5)
        destroy(plugin, cfg.id)
    stream.cancel()
    assert elapsed < 15, f"graceful stop took {elapsed:.1f}s"
    assert (result.result.exit_code, result.result.signal, result.err) == (0, 0, "")
    assert wait_until(lambda: any("Guest powered off" in m for m in events), 5), events
    assert any(m.startswith("ACPI shutdown requested") for m in events), events
    assert not any("terminated" in m for m in events), events
    assert not qemu_processes_under(short_tmp)


def test_guest_reboot_keeps_the_same_vm(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """`reboot -f` in the guest resets the VM in place: same task, same QEMU process."""
    stream, events = collect_events(plugin)
    run = "echo about-to-reboot; reboot -f"
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="reboot", run=run) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        (qemu,) = qemu_processes_under(short_tmp)
        assert wait_until(lambda: any("Guest rebooted" in m for m in events), 120), events
        assert wait_until(lambda: fifo.data.count(b"about-to-reboot") >= 2, 120)
        assert [p.pid for p in qemu_processes_under(short_tmp)] == [qemu.pid]
        status = drv(plugin).InspectTask(driver_pb2.InspectTaskRequest(task_id=cfg.id))
        assert status.task.state == driver_pb2.RUNNING
        stop(plugin, cfg.id, 2)
        wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    stream.cancel()

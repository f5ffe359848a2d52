"""VM lifecycle through the real plugin process: graceful stop, exit kinds, reboot in place."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under, wait_until
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


def _run_to_completion(
    plugin: PluginProcess,
    root: Path,
    guest,
    name: str,
    run: str,
    **kw,  # type: ignore[no-untyped-def]
) -> tuple[driver_pb2.WaitTaskResponse, bytes]:
    """Start a tiny guest running ``run``, wait for the VM to end; (result, console)."""
    with tiny_task(plugin, root, guest, alloc_name=name, run=run, **kw) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        result = wait(plugin, cfg.id, timeout=180)
        fifo.wait_for(b"no-such-marker", 1)  # let the last console bytes arrive
        destroy(plugin, cfg.id)
        return result, bytes(fifo.data)


def test_guest_kernel_panic_is_a_failed_exit(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    result, _ = _run_to_completion(
        plugin, short_tmp, tiny_guest, "panic", "echo c > /proc/sysrq-trigger"
    )
    stream.cancel()
    assert result.result.exit_code != 0
    assert "panicked" in result.err
    assert any("Guest kernel panicked" in m for m in events), events
    assert not qemu_processes_under(short_tmp)


def test_guest_ignoring_acpi_is_terminated_at_the_timeout(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    overrides = {"cmdline": f"{tiny_guest.cmdline} nomadvm.ignore_acpi=1"}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="deaf", overrides=overrides) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        elapsed = stop(plugin, cfg.id, 3)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    stream.cancel()
    assert 3.0 <= elapsed < 9.0, f"stopped after {elapsed:.1f}s, kill_timeout was 3s"
    assert result.result.signal != 0 and result.err == ""  # our own stop, not a crash
    assert any("did not stop within 3s, VM terminated" in m for m in events), events


def test_disk_thin_copy_resize_and_base_untouched(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The guest sees the grown disk and writes to it; the base image stays byte-identical."""
    import hashlib

    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMDISK!" + bytes(64 * 1024 * 1024 - 8))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    run = (
        "echo size=$(cat /sys/block/vda/size); head -c 8 /dev/vda; echo; "
        "echo written-by-guest | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null; echo wrote"
    )
    for thin in (True, False):
        overrides = {"image": str(base), "use_thin_copy": thin, "primary_disk_size": 128}
        result, console = _run_to_completion(
            plugin,
            short_tmp,
            tiny_guest,
            f"disk{int(thin)}",
            run,
            overrides=overrides,
            image_paths=[str(tiny_guest.vmlinux.parent), str(images)],
        )
        assert result.result.exit_code == 0, (result, console[-1500:])
        assert b"size=262144" in console, console[-1500:]  # 128 MiB in 512-byte sectors
        assert b"NVMDISK!" in console and b"wrote" in console
        assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def test_stats_include_the_guests_own_memory_use(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """RSS is QEMU's footprint on the host; USAGE is what the guest reports via its balloon."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="mem") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        stats = drv(plugin).TaskStats(
            driver_pb2.TaskStatsRequest(
                task_id=cfg.id, collection_interval=duration_pb2.Duration(seconds=1)
            )
        )
        memory = None
        deadline = time.monotonic() + 30
        for sample in stats:
            memory = sample.stats.agg_resource_usage.memory
            if driver_pb2.MemoryUsage.USAGE in memory.measured_fields or (
                time.monotonic() > deadline
            ):
                break
        stats.cancel()
        stop(plugin, cfg.id, 10)
        wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    assert memory is not None
    assert driver_pb2.MemoryUsage.USAGE in memory.measured_fields, memory
    # The guest has 160 MB; a busybox initramfs uses a small part of it.
    assert 0 < memory.usage < 160 * 1024 * 1024
    assert memory.rss > 0


def test_exec_and_signals_without_a_guest_agent_fail_clearly(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The tiny guest runs no qemu-guest-agent: exec must fail fast and say why, not hang."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="noagent") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).ExecTask(
                driver_pb2.ExecTaskRequest(task_id=cfg.id, command=["true"]), timeout=30
            )
        assert time.monotonic() - started < 10
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "qemu-guest-agent" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGHUP"))
        assert "SIGHUP" in err.value.details()
        # SIGTERM means "shut the machine down": the tiny guest honours the power button.
        drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGTERM"))
        assert (wait(plugin, cfg.id).result.exit_code) == 0
        destroy(plugin, cfg.id)

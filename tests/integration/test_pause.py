"""Pause and resume through the real plugin and a real QEMU running the tiny guest (TCG).

SIGSTOP: the guest's output stops and QEMU's CPU time stops advancing (psutil, compared with
its rate while the guest ran), and the task's stats say so; SIGCONT: the output goes on from
where it was. A stop of the paused VM still powers the guest off through the power button.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under, wait_until
from tests.integration.pluginkit import FifoReader, drv, tiny_task
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait

# The guest prints a counter ten times a second: progress is visible on its console.
COUNTER = 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.1; done'
TICK = re.compile(rb"tick (\d+)")
# How long CPU time and output are watched in each state. Under TCG a running tiny guest keeps
# QEMU busy (its timer interrupts and the counter loop); a paused one should cost ~nothing.
INTERVAL = 3.0


def last_tick(fifo: FifoReader) -> int:
    ticks = TICK.findall(bytes(fifo.data))
    return int(ticks[-1]) if ticks else -1


def wait_tick_beyond(fifo: FifoReader, n: int, timeout: float = 60) -> int:
    assert wait_until(lambda: last_tick(fifo) > n, timeout), (n, bytes(fifo.data[-300:]))
    return last_tick(fifo)


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def rate_over(proc: psutil.Process, fifo: FifoReader) -> tuple[float, int, int]:
    """CPU seconds per second of ``proc`` over INTERVAL, and the ticks seen before and after."""
    before_tick = last_tick(fifo)
    before, started = cpu_seconds(proc), time.monotonic()
    time.sleep(INTERVAL)  # the measurement interval itself, not a synchronisation
    elapsed = time.monotonic() - started
    return (cpu_seconds(proc) - before) / elapsed, before_tick, last_tick(fifo)


def stats_percent(plugin: PluginProcess, task_id: str, samples: int = 4) -> float:
    """The highest CPU percent the task's stats report over a few samples."""
    stream = drv(plugin).TaskStats(
        driver_pb2.TaskStatsRequest(
            task_id=task_id, collection_interval=duration_pb2.Duration(nanos=500_000_000)
        )
    )
    seen = []
    for reply in stream:
        seen.append(reply.stats.agg_resource_usage.cpu.percent)
        if len(seen) > samples:  # the first sample has no interval behind it
            break
    stream.cancel()
    return max(seen[1:])


def signal(plugin: PluginProcess, task_id: str, name: str) -> None:
    drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=task_id, signal=name), timeout=30)


def test_sigstop_freezes_the_guest_and_sigcont_resumes_it(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="pause", run=COUNTER) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        wait_tick_beyond(fifo, 5, timeout=180)
        (qemu,) = qemu_processes_under(short_tmp)

        running_rate, first, last = rate_over(qemu, fifo)
        assert last > first, "the guest's counter advances while it runs"
        running_stats = stats_percent(plugin, cfg.id)

        signal(plugin, cfg.id, "SIGSTOP")
        # SignalTask returns once QMP `stop` has: the vCPUs no longer run.
        assert wait_until(lambda: any(m.startswith("VM paused") for m in events), 10), events
        # QEMU wrote the guest's output before `stop` returned; let the reader take what is
        # still in the FIFO (and finish its current pass) before counting.
        assert wait_until(fifo.drained, 5)
        time.sleep(0.2)  # the reading thread's poll period (select timeout 0.1 s), twice
        paused_rate, first, last = rate_over(qemu, fifo)
        assert last == first, f"the counter went on while paused ({first} -> {last})"
        paused_stats = stats_percent(plugin, cfg.id)

        signal(plugin, cfg.id, "SIGCONT")
        assert wait_until(lambda: any(m == "VM resumed" for m in events), 10), events
        resumed_at = wait_tick_beyond(fifo, last, timeout=30)
        # Resumed, not rebooted: the counter continues from where it stopped.
        assert resumed_at <= last + 20, (last, resumed_at)

        signal(plugin, cfg.id, "SIGSTOP")
        assert wait_until(lambda: sum(m.startswith("VM paused") for m in events) == 2, 10)
        # A stop of the paused VM: resumed first, so the guest powers off on the button.
        assert stop(plugin, cfg.id, 20) < 15
        result = wait(plugin, cfg.id)
        assert fifo.wait_for(b"power button pressed", 5)
        destroy(plugin, cfg.id)
    stream.cancel()
    print(
        f"QEMU CPU s/s: running {running_rate:.3f}, paused {paused_rate:.4f}; "
        f"stats percent: running {running_stats:.1f}, paused {paused_stats:.2f}"
    )
    assert running_rate > 0.02, running_rate
    assert paused_rate < min(0.02, running_rate / 5), (running_rate, paused_rate)
    assert paused_stats < min(2.0, running_stats / 5), (running_stats, paused_stats)
    assert (result.result.exit_code, result.err) == (0, ""), result
    assert any(m.startswith("VM resumed to be stopped") for m in events), events
    assert not any("terminated" in m for m in events), events
    assert not qemu_processes_under(short_tmp)

"""snapshot_on_stop through the real plugin and a real QEMU running the tiny guest (TCG).

The guest writes a mark to its (raw, empty) disk, then prints a counter. StopTask saves the
VM into the task's `local/.nomad-vm-snapshot/` (state, record, the disk) and ends QEMU; the
next StartTask of the task (a new task id, the same allocation, as Nomad's restart does)
resumes it: the counter goes on from the next number, the guest does not boot again, the disk
holds the mark, and the snapshot is gone. A snapshot of another machine (the task's memory
changed) is refused with an event naming the difference, removed, and the VM boots. A save
that fails (the task's local/ swapped for a symlink) stops the VM the usual way.
"""

from __future__ import annotations

import re
import signal
import stat
from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.cgroups import cgroup_name
from tests.conftest import qemu_processes_under, task_cgroups, wait_until
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait

MARK = b"nomad-vm-snapshot-disk-mark"
COUNTER = (
    f"printf '{MARK.decode()}' | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null; "
    'i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.2; done'
)
COUNT = re.compile(rb"count (\d+)")
BANNER = b"nomad-vm tiny guest: booted"
OPTIONS = {
    "snapshot_on_stop": True,
    # The task's directories would be shared over virtio-fs, which QEMU cannot save.
    "share_task_dirs": False,
    "disk": [{"size": "4MiB", "format": "raw"}],
}


def own_cgroups(root: Path, *task_ids: str) -> list[Path]:
    """The task cgroups of these tasks that still exist (this test's, not the host's)."""
    names = {cgroup_name(task_id, str(root / "data")) for task_id in task_ids}
    return [p for p in task_cgroups() if p.name in names]


def counts(data: bytes) -> list[int]:
    return [int(n) for n in COUNT.findall(data)]


def start(plugin: PluginProcess, cfg: driver_pb2.TaskConfig) -> None:
    drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)


def restarted(cfg: driver_pb2.TaskConfig, n: int) -> driver_pb2.TaskConfig:
    """The task's next start in its allocation: Nomad gives it a new id, the same dirs."""
    again = driver_pb2.TaskConfig()
    again.CopyFrom(cfg)
    again.id = f"{cfg.id}-{n}"
    return again


def stop_and_destroy(plugin: PluginProcess, task_id: str) -> driver_pb2.WaitTaskResponse:
    stop(plugin, task_id, 30)
    result = wait(plugin, task_id, 120)
    destroy(plugin, task_id)
    return result


def run_until(fifo: FifoReader, n: int) -> None:
    assert wait_until(lambda: max(counts(bytes(fifo.data)), default=0) >= n, 120), bytes(
        fifo.data[-500:]
    )


def test_a_stopped_task_resumes_where_it_was(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="snap", run=COUNTER, overrides=OPTIONS
    ) as (cfg, fifo, alloc):
        local = alloc / "tiny" / "local"
        local.mkdir()
        snapshot = local / ".nomad-vm-snapshot"
        start(plugin, cfg)
        run_until(fifo, 5)
        stop_and_destroy(plugin, cfg.id)
        assert wait_until(lambda: any(e.startswith("VM paused and saved") for e in events), 10)
        before = bytes(fifo.data)
        last = counts(before)[-1]
        # The snapshot: the state, its record and the disk, root's only.
        assert sorted(p.name for p in snapshot.iterdir()) == ["disk.raw", "record.json", "state"]
        assert stat.S_IMODE(snapshot.stat().st_mode) == 0o700
        for path in snapshot.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert path.stat().st_uid == 0
        assert MARK in (snapshot / "disk.raw").read_bytes()
        # Nothing of the stopped start is left but the snapshot.
        assert not qemu_processes_under(short_tmp)
        assert not [p for p in (alloc / "tiny").iterdir() if p.name.startswith("nomad-vm-")]

        second = restarted(cfg, 2)
        start(plugin, second)
        # Used once: gone as soon as the VM runs again.
        assert not snapshot.exists()
        assert wait_until(lambda: any(e.startswith("VM restored from") for e in events), 10)
        run_until(fifo, last + 5)
        after = bytes(fifo.data[len(before) :])
        # The counter goes on from the next number; the guest did not boot again.
        assert counts(after)[0] == last + 1, (last, after[:200])
        assert BANNER not in after and b"Linux version" not in after, after[:500]
        # The disk it runs on is the one saved, mark and all.
        (run_dir,) = [p for p in (alloc / "tiny").iterdir() if p.name.startswith("nomad-vm-")]
        assert MARK in (run_dir / "disk.raw").read_bytes()
        destroy(plugin, second.id)  # killed: no stop, so no new snapshot
    stream.cancel()
    assert not snapshot.exists()
    assert not list(local.iterdir())
    assert not qemu_processes_under(short_tmp)
    assert not own_cgroups(short_tmp, cfg.id, second.id)
    assert not [p for p in (alloc / "tiny").iterdir() if p.name.startswith("nomad-vm-")]
    assert not own_cgroups(short_tmp, cfg.id, second.id)


def test_a_snapshot_of_another_machine_is_refused_and_the_vm_boots(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="snapx", run=COUNTER, overrides=OPTIONS
    ) as (cfg, fifo, alloc):
        local = alloc / "tiny" / "local"
        local.mkdir()
        start(plugin, cfg)
        run_until(fifo, 3)
        stop_and_destroy(plugin, cfg.id)
        assert (local / ".nomad-vm-snapshot" / "state").is_file()
        before = bytes(fifo.data)

        second = restarted(cfg, 2)
        second.resources.allocated_resources.memory.memory_mb = 192
        start(plugin, second)
        assert wait_until(lambda: any(e.startswith("VM started") for e in events[2:]), 10)
        refusals = [e for e in events if e.startswith("Snapshot refused")]
        assert len(refusals) == 1, events
        assert "memory_mb: 160 then, 192 now" in refusals[0], refusals
        assert not (local / ".nomad-vm-snapshot").exists()
        assert not any(e.startswith("VM restored from snapshot") for e in events), events
        # A cold boot: the banner again, and the counter from 1.
        assert wait_until(lambda: BANNER in bytes(fifo.data[len(before) :]), 120)
        assert wait_until(lambda: b"count 1\r" in bytes(fifo.data[len(before) :]), 60)
        destroy(plugin, second.id)
    stream.cancel()
    assert not list(local.iterdir())
    assert not qemu_processes_under(short_tmp)
    assert not own_cgroups(short_tmp, cfg.id, second.id)


def test_a_save_that_fails_stops_the_vm_as_usual_and_writes_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The task's local/ is a symlink to another directory (someone with access to the task
    directory swapped it): the save refuses to follow it, says so, and the VM, paused for the
    save, is resumed and shut down through the power button."""
    stream, events = collect_events(plugin)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="snapf", run=COUNTER, overrides=OPTIONS
    ) as (cfg, fifo, alloc):
        elsewhere = short_tmp / "elsewhere"
        elsewhere.mkdir()
        (alloc / "tiny" / "local").symlink_to(elsewhere)
        start(plugin, cfg)
        run_until(fifo, 3)
        result = stop_and_destroy(plugin, cfg.id)
    stream.cancel()
    assert wait_until(lambda: any("Guest powered off" in e for e in events), 10), events
    failed = [e for e in events if e.startswith("Snapshot failed")]
    assert len(failed) == 1 and "local" in failed[0], events
    assert any(e.startswith("VM resumed to be stopped") for e in events), events
    assert any(e.startswith("ACPI shutdown requested") for e in events), events
    assert (result.result.exit_code, result.err) == (0, ""), result
    assert not list(elsewhere.iterdir())
    assert not qemu_processes_under(short_tmp)
    assert not own_cgroups(short_tmp, cfg.id)


def test_a_plugin_restarted_meanwhile_still_saves_and_resumes(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """What to save is on record in the start's runtime directory, not in the plugin: a
    plugin that recovered the task (the first was SIGKILLed) saves it at the stop."""
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second = PluginProcess([str(DRIVER)])
    try:
        with tiny_task(
            first, short_tmp, tiny_guest, alloc_name="snapr", run=COUNTER, overrides=OPTIONS
        ) as (cfg, fifo, alloc):
            (alloc / "tiny" / "local").mkdir()
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
            run_until(fifo, 3)
            first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.wait_exit(5)
            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            stream, events = collect_events(second)
            recover(second, handle.handle)
            stop_and_destroy(second, cfg.id)
            assert wait_until(lambda: any(e.startswith("VM paused and saved") for e in events), 10)
            last = counts(bytes(fifo.data))[-1]
            again = restarted(cfg, 2)
            start(second, again)
            run_until(fifo, last + 3)
            assert counts(bytes(fifo.data)).count(last + 1) == 1
            destroy(second, again.id)
            stream.cancel()
        assert not qemu_processes_under(short_tmp)
        assert not own_cgroups(short_tmp, cfg.id, again.id)
    finally:
        first.kill()
        second.kill()

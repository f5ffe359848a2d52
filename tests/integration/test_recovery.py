"""Recovery: SIGKILL the plugin while VMs run; a new plugin process reattaches to each of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import msgpack
import psutil
from google.protobuf import duration_pb2

from nomad_vm.errors import HypervisorError
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.qemu.monitor import QemuMonitor
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_vm_lifecycle import RUNNING, stop, wait, wait_until


def recover(plugin: PluginProcess, handle: driver_pb2.TaskHandle) -> None:
    # After an agent restart Nomad sends the handle without the job's config (not persisted).
    stored = driver_pb2.TaskHandle()
    stored.CopyFrom(handle)
    stored.config.msgpack_driver_config = b""
    drv(plugin).RecoverTask(driver_pb2.RecoverTaskRequest(handle=stored))


def still_waiting(plugin: PluginProcess, task_id: str) -> bool:
    try:
        wait(plugin, task_id, timeout=0.5)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return False


def test_recovery_after_plugin_sigkill(short_tmp: Path, tiny_guest) -> None:  # type: ignore[no-untyped-def]
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    handles: dict[str, driver_pb2.TaskHandle] = {}
    consoles = {}
    with contextlib.ExitStack() as stack:
        for name, run in (("vm1", None), ("vm2", None), ("vm3", None), ("off", "sleep 6")):
            cfg, fifo, _ = stack.enter_context(
                tiny_task(first, short_tmp, tiny_guest, alloc_name=name, run=run)
            )
            resp = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            handles[name] = resp.handle
            consoles[name] = fifo
            assert fifo.wait_for(b"tiny guest: booted", 120), name
        pids = {name: _qemu_pid(short_tmp, name) for name in handles}

        first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.wait_exit(5)
        first.kill()
        os.kill(pids["vm3"], signal.SIGKILL)  # this VM dies while no plugin is watching
        # ... and "off" powers itself off meanwhile: QEMU keeps that verdict, paused.
        assert consoles["off"].wait_for(b"command exited with status 0", 120)
        assert wait_until(lambda: _run_state(handles["off"]) == "shutdown", 60)
        assert wait_until(lambda: not psutil.pid_exists(pids["vm3"]), 10)

        second = PluginProcess([str(DRIVER)])
        second.start(short_tmp / "plugin2.stderr")
        try:
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            for handle in handles.values():
                recover(second, handle)
            _check_recovered(second, handles, pids, short_tmp)
        finally:
            second.kill()
    assert not qemu_processes_under(short_tmp)


def _run_state(handle: driver_pb2.TaskHandle) -> str:
    """The run state QEMU reports over QMP (no plugin holds the socket now): "shutdown" once
    the guest has powered off and QEMU keeps the verdict."""
    state = msgpack.unpackb(handle.driver_state)
    return asyncio.run(_query_status(Path(state["control_socket"])))


async def _query_status(socket: Path) -> str:
    monitor = QemuMonitor(socket)
    try:
        await monitor.connect()
        return await monitor.status()
    except HypervisorError:
        return ""
    finally:
        await monitor.close()


def _qemu_pid(root: Path, alloc_name: str) -> int:
    (proc,) = qemu_processes_under(root / alloc_name)
    return proc.pid


def _check_recovered(
    plugin: PluginProcess,
    handles: dict[str, driver_pb2.TaskHandle],
    pids: dict[str, int],
    root: Path,
) -> None:
    ids = {name: h.config.id for name, h in handles.items()}

    def survivors() -> list[int]:
        return sorted(p.pid for p in qemu_processes_under(root) if p.status() != "zombie")

    # Nothing was booted twice: no QEMU but the ones started before; the one that powered off
    # is ended by the new plugin once it has its verdict, the other two run on.
    assert set(survivors()) <= set(pids.values()), (survivors(), pids)
    assert wait_until(lambda: survivors() == sorted([pids["vm1"], pids["vm2"]]), 30), survivors()
    for name in ("vm1", "vm2"):
        assert still_waiting(plugin, ids[name]), name
    stats = drv(plugin).TaskStats(
        driver_pb2.TaskStatsRequest(
            task_id=ids["vm1"], collection_interval=duration_pb2.Duration(nanos=200_000_000)
        )
    )
    assert next(stats).stats.agg_resource_usage.memory.rss > 0
    stats.cancel()

    killed = wait(plugin, ids["vm3"])
    assert killed.result.exit_code != 0 and killed.err, killed
    powered_off = wait(plugin, ids["off"])
    assert (powered_off.result.exit_code, powered_off.err) == (0, ""), powered_off

    for name in ("vm1", "vm2"):
        assert stop(plugin, ids[name], 20) < 15
        done = wait(plugin, ids[name])
        assert (done.result.exit_code, done.err) == (0, ""), (name, done)
    for task_id in ids.values():
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task_id, force=True))
    assert wait_until(lambda: not qemu_processes_under(root), 10)


def test_recycled_pid_is_never_taken_for_our_vm(plugin: PluginProcess, short_tmp: Path) -> None:
    """A handle whose pid now belongs to another process: reported as ended, process untouched."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        configure(plugin, short_tmp / "data", [])
        state = {
            "task_id": "a/x/1",
            "backend": "qemu",
            "pid": other.pid,
            "process_start_time": psutil.Process(other.pid).create_time() - 1000.0,
            "control_socket": str(short_tmp / "nope" / "qmp.sock"),
            "runtime_dir": str(short_tmp / "nope"),
            "started_at": time.time() - 1000.0,
            "version": 1,
        }
        handle = driver_pb2.TaskHandle(
            version=1,
            config=driver_pb2.TaskConfig(id="a/x/1", name="x", alloc_id="a"),
            state=driver_pb2.RUNNING,
            driver_state=msgpack.packb(state),
        )
        drv(plugin).RecoverTask(driver_pb2.RecoverTaskRequest(handle=handle))
        result = wait(plugin, "a/x/1", timeout=10)
        assert result.result.exit_code != 0 and "not running" in result.err
        drv(plugin).StopTask(driver_pb2.StopTaskRequest(task_id="a/x/1"))
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id="a/x/1", force=True))
        assert other.poll() is None, "the unrelated process must not be touched"
    finally:
        other.kill()
        other.wait()


def test_recover_is_idempotent_while_the_plugin_lives(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="idem") as (cfg, fifo, _):
        resp = drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        recover(plugin, resp.handle)
        assert len(qemu_processes_under(short_tmp)) == 1
        stop(plugin, cfg.id, 20)
        wait(plugin, cfg.id)
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))

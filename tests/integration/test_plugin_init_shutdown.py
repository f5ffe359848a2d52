"""Driver.Init and Driver.Shutdown (Nomad 2.0.4+) on the real plugin process with a real VM.

Nomad 2.x cannot be built from the Go module proxy, so the calls are made here the way its
client makes them (docs/plugin-protocol.md, "Init and Shutdown"): Init after SetConfig and
again on a reattach; on a graceful agent shutdown, Shutdown with a 2 s deadline, then go-plugin's
Kill (GRPCController.Shutdown). VMs outlive the plugin either way.
"""

from __future__ import annotations

from pathlib import Path

import psutil
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import base_pb2, driver_pb2, goplugin_pb2, goplugin_pb2_grpc
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import DRIVER, FifoReader, base, configure, drv, tiny_task
from tests.integration.test_recovery import recover, still_waiting
from tests.integration.test_vm_lifecycle import destroy, wait, wait_until

# Nomad's deadline for Driver.Shutdown (client/pluginmanager/drivermanager/instance.go).
NOMAD_SHUTDOWN_TIMEOUT = 2.0


def init(plugin: PluginProcess) -> None:
    drv(plugin).Init(driver_pb2.InitRequest())


def start_task(
    plugin: PluginProcess, cfg: driver_pb2.TaskConfig, fifo: FifoReader
) -> tuple[driver_pb2.TaskHandle, psutil.Process]:
    init(plugin)  # Nomad: right after SetConfig, before any task call
    handle = drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
    assert fifo.wait_for(b"tiny guest: booted", 120), bytes(fifo.data[-2000:])
    (qemu,) = qemu_processes_under(Path(cfg.alloc_dir).parent)
    return handle, qemu


def stop_and_clean_up(plugin: PluginProcess, task_id: str, root: Path) -> None:
    # A deadline on the call: a driver left with closed connections never sees the VM end.
    request = driver_pb2.StopTaskRequest(task_id=task_id, timeout=duration_pb2.Duration(seconds=20))
    drv(plugin).StopTask(request, timeout=90)
    done = wait(plugin, task_id)
    assert (done.result.exit_code, done.err) == (0, ""), done
    destroy(plugin, task_id)
    assert wait_until(lambda: not qemu_processes_under(root), 10)


def test_graceful_agent_shutdown_leaves_the_vm_to_the_next_plugin(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second = PluginProcess([str(DRIVER)])
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="graceful") as (cfg, fifo, _):
            handle, qemu = start_task(first, cfg, fifo)
            drv(first).Shutdown(driver_pb2.ShutdownRequest(), timeout=NOMAD_SHUTDOWN_TIMEOUT)
            # Still serving: Nomad's Kill comes next; only a plugin that has exited is spared it.
            assert base(first).PluginInfo(base_pb2.PluginInfoRequest()).name == "vm"
            goplugin_pb2_grpc.GRPCControllerStub(first.channel).Shutdown(goplugin_pb2.Empty())
            assert first.wait_exit(5) == 0
            assert qemu.is_running() and qemu.status() != psutil.STATUS_ZOMBIE

            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            init(second)
            recover(second, handle)
            assert still_waiting(second, handle.config.id)
            assert [p.pid for p in qemu_processes_under(short_tmp)] == [qemu.pid]
            stop_and_clean_up(second, handle.config.id, short_tmp)
    finally:
        first.kill()
        second.kill()


def test_an_agent_reattaching_after_shutdown_gets_working_tasks(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The agent sent Shutdown and died before its Kill: the next agent reattaches to this
    very process (no SetConfig), calls Init and recovers the tasks. They must be watched
    again, not left with the connections the Shutdown closed."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="reattach") as (cfg, fifo, _):
        handle, qemu = start_task(plugin, cfg, fifo)
        drv(plugin).Shutdown(driver_pb2.ShutdownRequest(), timeout=NOMAD_SHUTDOWN_TIMEOUT)
        init(plugin)
        init(plugin)  # idempotent: a second agent could reattach again
        recover(plugin, handle)
        assert still_waiting(plugin, cfg.id)
        stats = drv(plugin).TaskStats(
            driver_pb2.TaskStatsRequest(
                task_id=cfg.id, collection_interval=duration_pb2.Duration(nanos=200_000_000)
            )
        )
        assert next(stats).stats.agg_resource_usage.memory.rss > 0
        stats.cancel()
        assert [p.pid for p in qemu_processes_under(short_tmp)] == [qemu.pid]
        stop_and_clean_up(plugin, cfg.id, short_tmp)

"""A task started again under a new id while the VM of its earlier start still runs, unknown
to the plugin: what Nomad does when a plugin dies and its successor dies too before Nomad
could recover the task through it (found by tests/e2e/test_cluster.py's chaos run). The new
start stops and cleans the old VM first: one VM per task of an allocation, never two.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under, task_state_in
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_vm_lifecycle import destroy, stop

pytestmark = pytest.mark.integration


def test_a_new_start_of_the_task_stops_the_vm_an_earlier_start_left(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    with tiny_task(first, short_tmp, tiny_guest, alloc_name="first") as (cfg, fifo, _):
        drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(b"tiny guest: booted", 120)
        (old,) = qemu_processes_under(short_tmp)
        first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.wait_exit(5)
        first.kill()
        assert old.is_running()  # nobody will recover it: Nomad gave up on this start

        second = PluginProcess([str(DRIVER)])
        second.start(short_tmp / "plugin2.stderr")
        try:
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            again = driver_pb2.TaskConfig()
            again.CopyFrom(cfg)
            again.id = cfg.id.rsplit("/", 1)[0] + "/again"  # same allocation and task
            drv(second).StartTask(driver_pb2.StartTaskRequest(task=again), timeout=60)
            # Ended before the new VM started (a zombie of the killed plugin's, at most).
            assert not old.is_running() or old.status() == psutil.STATUS_ZOMBIE
            assert [p.pid for p in qemu_processes_under(short_tmp)] != [old.pid]
            assert len(qemu_processes_under(short_tmp)) == 1
            stop(second, again.id, 10)
            destroy(second, again.id)
        finally:
            second.kill()
    assert not qemu_processes_under(short_tmp)
    assert not task_state_in(short_tmp / "data")

"""200 start/stop cycles through the real plugin: nothing may accumulate.

Cycles mix a VM that starts and is stopped by force, a start that fails validation, and a start
where QEMU itself fails. Compared after a warm-up: the plugin's open files, threads, child
processes and memory, plus files left in the data dir and allocation dirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import task_state_in, vm_processes_under
from tests.integration.pluginkit import FifoReader, configure, drv, task_config

CYCLES = int(os.environ.get("NOMAD_VM_LEAK_CYCLES", "200"))
WARMUP = 10


def _cycle(plugin: PluginProcess, root: Path, guest, i: int) -> None:  # type: ignore[no-untyped-def]
    alloc = root / "alloc"
    kind = i % 3
    kernel = {0: str(guest.vmlinux), 1: "/etc/hostname", 2: str(root / "images" / "bad-elf")}[kind]
    cfg = task_config(
        alloc,
        {"kernel": kernel, "initramfs": str(guest.initramfs), "cmdline": guest.cmdline},
        task_id=f"alloc/tiny/{i}",
    )
    if kind == 0:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        drv(plugin).StopTask(
            driver_pb2.StopTaskRequest(task_id=cfg.id, timeout=duration_pb2.Duration(seconds=0))
        )
        drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=cfg.id), timeout=30)
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    else:
        with pytest.raises(grpc.RpcError):
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)


def _measure(plugin: PluginProcess) -> dict[str, int]:
    assert plugin.process is not None
    proc = psutil.Process(plugin.process.pid)
    return {
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
        "children": len(proc.children(recursive=True)),
        "rss_mb": proc.memory_info().rss // (1024 * 1024),
    }


def test_no_growth_over_many_cycles(plugin: PluginProcess, short_tmp: Path, tiny_guest) -> None:  # type: ignore[no-untyped-def]
    images = short_tmp / "images"
    images.mkdir()
    (images / "bad-elf").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 4089)
    data_dir = short_tmp / "data"
    configure(plugin, data_dir, [str(tiny_guest.vmlinux.parent), str(images)])
    (short_tmp / "alloc" / "tiny").mkdir(parents=True)
    fifo = FifoReader(short_tmp / "alloc" / "alloc" / "logs" / ".tiny.stdout.fifo")
    try:
        for i in range(WARMUP):
            _cycle(plugin, short_tmp, tiny_guest, i)
        before = _measure(plugin)
        for i in range(WARMUP, WARMUP + CYCLES):
            _cycle(plugin, short_tmp, tiny_guest, i)
        after = _measure(plugin)
    finally:
        fifo.close()
    print(f"plugin before {before}, after {CYCLES} cycles {after}")
    assert after["fds"] <= before["fds"]
    assert after["threads"] <= before["threads"] + 2
    assert after["children"] == 0
    assert after["rss_mb"] - before["rss_mb"] < 20, (before, after)
    assert not vm_processes_under(short_tmp)
    assert list((short_tmp / "alloc" / "tiny").iterdir()) == []
    assert task_state_in(data_dir) == []  # the control socket lives as long as the plugin

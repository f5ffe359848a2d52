"""Density and recovery with many VMs (default 20 tiny guests).

* Density: the plugin's RSS and CPU while N VMs run and N TaskStats streams report every second,
  next to the VMs' own QEMU RSS for scale.
* Recovery: SIGKILL the plugin, start a fresh one and time RecoverTask for all N VMs (from the
  exec of the new plugin to the last RecoverTask answer), checking that no VM was booted twice.
Run: .venv/bin/python bench/many_vms.py [--vms N] [--seconds S]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from google.protobuf import duration_pb2  # noqa: E402

from nomad_vm.guests.tiny import build_tiny  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from tests.conftest import guest_cache, qemu_processes_under  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402


def start_vms(plugin: PluginProcess, root: Path, guest, n: int) -> list[driver_pb2.TaskHandle]:  # type: ignore[no-untyped-def]
    handles = []
    for i in range(n):
        cfg = task_config(
            root / "alloc",
            {
                "kernel": str(guest.vmlinux),
                "initramfs": str(guest.initramfs),
                "cmdline": guest.cmdline,
            },
            task_id=f"alloc/tiny/{i}",
        )
        handles.append(drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg)).handle)
    return handles


def _drain(stream: object) -> None:
    try:
        for _ in stream:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError:
        pass  # cancelled at the end of the measurement


def stream_stats(plugin: PluginProcess, handles: list[driver_pb2.TaskHandle]) -> list[object]:
    streams = []
    for h in handles:
        req = driver_pb2.TaskStatsRequest(
            task_id=h.config.id, collection_interval=duration_pb2.Duration(seconds=1)
        )
        stream = drv(plugin).TaskStats(req)
        threading.Thread(target=_drain, args=(stream,), daemon=True).start()
        streams.append(stream)
    return streams


def density(plugin: PluginProcess, root: Path, seconds: float) -> None:
    assert plugin.process is not None
    proc = psutil.Process(plugin.process.pid)
    proc.cpu_percent()
    time.sleep(seconds)
    cpu = proc.cpu_percent()
    qemu_rss = [p.memory_info().rss for p in qemu_processes_under(root)]
    print(
        f"density: {len(qemu_rss)} VMs, stats every 1 s for {seconds:.0f} s: plugin RSS "
        f"{proc.memory_info().rss / 2**20:.0f} MiB, plugin CPU {cpu:.1f}% of one core; "
        f"QEMU RSS per VM {sum(qemu_rss) / len(qemu_rss) / 2**20:.0f} MiB (mean)"
    )


def recovery(root: Path, handles: list[driver_pb2.TaskHandle]) -> PluginProcess:
    pids = sorted(p.pid for p in qemu_processes_under(root))
    fresh = PluginProcess([str(DRIVER)])
    started = time.perf_counter()
    fresh.start(root / "plugin2.stderr")
    configure(fresh, root / "data", [])
    for h in handles:
        drv(fresh).RecoverTask(driver_pb2.RecoverTaskRequest(handle=h))
    elapsed = time.perf_counter() - started
    assert sorted(p.pid for p in qemu_processes_under(root)) == pids, "a VM was booted twice"
    print(
        f"recovery: {len(handles)} VMs recovered by a fresh plugin in {elapsed * 1000:.0f} ms "
        f"({elapsed * 1000 / len(handles):.1f} ms per VM, including the plugin's own start)"
    )
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    guest = build_tiny(guest_cache())
    with tempfile.TemporaryDirectory(prefix="nvm-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "alloc" / "tiny").mkdir(parents=True)
        fifo = FifoReader(root / "alloc" / "alloc" / "logs" / ".tiny.stdout.fifo")
        plugin = PluginProcess([str(DRIVER)])
        plugin.start(root / "plugin.stderr")
        fresh = None
        try:
            configure(plugin, root / "data", [str(guest.vmlinux.parent)])
            handles = start_vms(plugin, root, guest, args.vms)
            while fifo.data.count(b"tiny guest: running") < args.vms:
                time.sleep(1)
            streams = stream_stats(plugin, handles)
            density(plugin, root, args.seconds)
            for s in streams:
                s.cancel()  # type: ignore[attr-defined]
            plugin.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            plugin.wait_exit(5)
            fresh = recovery(root, handles)
            for h in handles:
                drv(fresh).StopTask(
                    driver_pb2.StopTaskRequest(
                        task_id=h.config.id, timeout=duration_pb2.Duration(seconds=0)
                    )
                )
                drv(fresh).DestroyTask(
                    driver_pb2.DestroyTaskRequest(task_id=h.config.id, force=True)
                )
        finally:
            fifo.close()
            plugin.kill()
            if fresh is not None:
                fresh.kill()
            for p in qemu_processes_under(root):
                p.kill()


if __name__ == "__main__":
    main()

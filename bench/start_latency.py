"""Start latency: StartTask until QMP answers, against bare QEMU with the same arguments.

Both sides are measured alternately in one run, so machine load affects them alike:

* driver: the StartTask RPC to a running nomad-driver-vm (validation, accelerator choice, disk
  preparation, the log FIFO, QEMU, waiting for QMP) as Nomad sends it;
* bare:   exec of qemu-system-x86_64 with the argv our builder produced for that task, until
  its QMP socket answers query-status.

Two cases: a kernel-only VM (the tiny guest), and a VM with a thin copy of a 10 GiB image.
Run: .venv/bin/python bench/start_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nomad_vm.guests.tiny import build_tiny  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from nomad_vm.vm.qemu.argv import qemu_argv  # noqa: E402
from nomad_vm.vm.qemu.monitor import connect_when_ready  # noqa: E402
from nomad_vm.vm.spec import DiskSpec, VMSpec  # noqa: E402
from tests.conftest import guest_cache  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402


def time_driver(plugin: PluginProcess, root: Path, config: dict[str, object], i: int) -> float:
    cfg = task_config(root / "alloc", config, task_id=f"alloc/tiny/{i}")
    started = time.perf_counter()
    drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    elapsed = time.perf_counter() - started
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    return elapsed


def time_bare(spec: VMSpec) -> float:
    spec.control_socket.unlink(missing_ok=True)
    argv = qemu_argv("qemu-system-x86_64", spec)
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    async def ready() -> None:
        async def running() -> bool:
            return proc.poll() is None

        monitor, _ = await connect_when_ready(spec.control_socket, running, 30)
        await monitor.close()

    asyncio.run(ready())
    elapsed = time.perf_counter() - started
    proc.kill()
    proc.wait()
    return elapsed


def run_case(
    name: str, runs: int, plugin: PluginProcess, root: Path, config: dict[str, object], spec: VMSpec
) -> None:
    ours, bare = [], []
    for i in range(runs):
        ours.append(time_driver(plugin, root, config, i))
        bare.append(time_bare(spec))
    o, b = statistics.median(ours), statistics.median(bare)
    print(
        f"{name:28s} driver {o * 1000:7.1f} ms   bare QEMU {b * 1000:7.1f} ms   "
        f"ratio {o / b:4.2f}   overhead {(o - b) * 1000:6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    guest = build_tiny(guest_cache())
    with tempfile.TemporaryDirectory(prefix="nvb-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "alloc" / "tiny").mkdir(parents=True)
        image = root / "images" / "big.raw"
        image.parent.mkdir()
        subprocess.run(["truncate", "-s", "10G", str(image)], check=True)
        plugin = PluginProcess([str(DRIVER)])
        plugin.start(root / "plugin.stderr")
        fifo = FifoReader(root / "alloc" / "alloc" / "logs" / ".tiny.stdout.fifo")
        try:
            configure(plugin, root / "data", [str(guest.vmlinux.parent), str(image.parent)])
            kernel_cfg = {
                "kernel": str(guest.vmlinux),
                "initramfs": str(guest.initramfs),
                "cmdline": guest.cmdline,
            }
            base = VMSpec(
                name="bench",
                vcpus=1,
                memory_mb=160,
                kernel=guest.vmlinux,
                initramfs=guest.initramfs,
                cmdline=guest.cmdline,
                accelerator="tcg",
                control_socket=root / "bare.sock",
            )
            overlay = root / "bare-overlay.qcow2"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(image),
                    "-F",
                    "raw",
                    str(overlay),
                ],
                check=True,
            )
            print(f"runs: {args.runs} per side, alternating; medians")
            run_case("kernel-only VM", args.runs, plugin, root, kernel_cfg, base)
            disk_spec = VMSpec(**{**base.__dict__, "disk": DiskSpec(overlay, "qcow2")})
            run_case(
                "thin copy of a 10 GiB image",
                args.runs,
                plugin,
                root,
                {**kernel_cfg, "image": str(image)},
                disk_spec,
            )
        finally:
            fifo.close()
            plugin.kill()


if __name__ == "__main__":
    main()

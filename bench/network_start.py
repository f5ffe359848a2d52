"""What bridge networking adds to StartTask and DestroyTask, against the same VM without a NIC.

Three cases, measured alternately in one run so that machine load affects them alike, each a
kernel-only tiny VM started and destroyed through the real plugin:

* no NIC:        the baseline;
* NIC:           lease, TAP on the bridge, one port forward (nftables), QEMU with the TAP;
* NIC + DHCP:    the same on a plugin with ``dhcp = true`` (dnsmasq restarted with the host).

Everything happens in throwaway network namespaces (one plugin per namespace), checked for
leftovers afterwards as in the tests. Run as root: .venv/bin/python bench/network_start.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nomad_vm.guests.tiny import build_tiny  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from tests.conftest import guest_cache  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402
from tests.integration.test_vm_network import bridge_nic, forward, network_block  # noqa: E402
from tests.netns import isolated_namespaces  # noqa: E402


def start_and_destroy(
    plugin: PluginProcess, root: Path, config: dict[str, object], i: int
) -> tuple[float, float]:
    cfg = task_config(root / "alloc", config, task_id=f"alloc/tiny/{i}")
    if "network_interface" in config:
        forward(cfg, "http", 21000 + i % 1000, 8080)
    started = time.perf_counter()
    drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    start = time.perf_counter() - started
    started = time.perf_counter()
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True), timeout=60)
    return start, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    guest = build_tiny(guest_cache())
    vm = {
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initramfs),
        "cmdline": guest.cmdline,
        "share_task_dirs": False,
    }
    with (
        tempfile.TemporaryDirectory(prefix="nvb-", dir="/tmp") as tmp,
        isolated_namespaces(("nvtbr0", "nvt")) as spaces,
    ):
        root = Path(tmp)
        plugins, fifos = {}, []
        try:
            for dhcp in (False, True):
                ns = spaces.new()
                plugin = PluginProcess(["ip", "netns", "exec", ns, str(DRIVER)])
                plugin.start(root / f"plugin-{dhcp}.stderr")
                plugins[dhcp] = (plugin, root / f"p{int(dhcp)}")
                (root / f"p{int(dhcp)}" / "alloc" / "tiny").mkdir(parents=True)
                fifos.append(
                    FifoReader(
                        root / f"p{int(dhcp)}" / "alloc" / "alloc" / "logs" / ".tiny.stdout.fifo"
                    )
                )
                configure(plugin, root / f"p{int(dhcp)}" / "data", [str(guest.vmlinux.parent)],
                          network=network_block(dhcp=dhcp))  # fmt: skip
            nic = {**vm, "network_interface": bridge_nic(("http",))}
            cases = {
                "no NIC": (plugins[False], vm),
                "NIC (TAP, lease, forward)": (plugins[False], nic),
                "NIC + DHCP (dnsmasq)": (plugins[True], nic),
            }
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
            for i in range(args.runs):
                for name, ((plugin, proot), config) in cases.items():
                    times[name].append(start_and_destroy(plugin, proot, config, i))
        finally:
            for fifo in fifos:
                fifo.close()
            for plugin, _ in plugins.values():
                plugin.kill()
    base_start = statistics.median(t[0] for t in times["no NIC"])
    base_destroy = statistics.median(t[1] for t in times["no NIC"])
    print(f"runs: {args.runs} per case, alternating; medians")
    for name, samples in times.items():
        start = statistics.median(t[0] for t in samples)
        destroy = statistics.median(t[1] for t in samples)
        print(
            f"{name:26s} StartTask {start * 1000:6.1f} ms (ratio {start / base_start:4.2f}, "
            f"+{(start - base_start) * 1000:5.1f} ms)   DestroyTask {destroy * 1000:6.1f} ms "
            f"(+{(destroy - base_destroy) * 1000:5.1f} ms)"
        )


if __name__ == "__main__":
    main()

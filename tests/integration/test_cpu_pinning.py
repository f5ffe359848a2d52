"""vCPU pinning through the real plugin with real QEMU: a task with reserved cores (Nomad's
cpuset in its resources) has each vCPU thread's affinity set to its own core, and a task
event says so; without reserved cores nothing is pinned."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import RUNNING, collect_events, destroy

HOST_CPUS = sorted(os.sched_getaffinity(0))


def vcpu_affinity(qemu: psutil.Process) -> dict[str, str]:
    """Cpus_allowed_list of each vCPU thread, by thread name ("CPU 0/TCG": -name
    debug-threads=on)."""
    found = {}
    for thread in qemu.threads():
        status = Path(f"/proc/{qemu.pid}/task/{thread.id}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields["Name"].startswith("CPU "):
            found[fields["Name"].strip()] = fields["Cpus_allowed_list"].strip()
    return found


@pytest.mark.parametrize("cores", [HOST_CPUS[-1:], HOST_CPUS[:2]], ids=["one", "two"])
def test_each_vcpu_runs_on_its_reserved_core(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    cores: list[int],
) -> None:
    if len(set(cores)) != len(cores):
        pytest.skip("the host has one CPU")
    stream, events = collect_events(plugin)
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="pin") as (cfg, fifo, _):
        cfg.resources.linux_resources.cpuset_cpus = ",".join(map(str, cores))
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            # Multi-threaded TCG (QEMU's default for x86 on x86) and KVM: a thread per vCPU,
            # named "CPU <i>/TCG" or "CPU <i>/KVM".
            affinity = vcpu_affinity(qemu)
            accel = next(iter(affinity)).split("/")[1]
            assert affinity == {f"CPU {i}/{accel}": str(c) for i, c in enumerate(cores)}
        finally:
            destroy(plugin, cfg.id)
    stream.cancel()
    pins = ", ".join(f"vCPU {i} on CPU {c}" for i, c in enumerate(cores))
    assert f"vCPUs pinned to the reserved cores: {pins}" in events, events


def test_without_reserved_cores_nothing_is_pinned(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="nopin") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            # Every vCPU thread may run wherever QEMU itself may.
            main = Path(f"/proc/{qemu.pid}/status").read_text()
            qemu_cpus = main.split("Cpus_allowed_list:\t")[1].split()[0]
            assert set(vcpu_affinity(qemu).values()) == {qemu_cpus}
        finally:
            destroy(plugin, cfg.id)
    stream.cancel()
    assert not any(m.startswith("vCPUs pinned") for m in events), events

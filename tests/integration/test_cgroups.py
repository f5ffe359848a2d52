"""The task's cgroup through the real plugin with real QEMU (TCG here): while the VM runs, the
cgroup files hold the task's CPU shares, its reserved core and the memory limit, QEMU and its
helpers (virtiofsd, swtpm) are in it, and the one vCPU runs only on the reserved core; the
cgroup survives a plugin SIGKILL with its VM and is removed by DestroyTask, also when the plugin
died around the cgroup step; `cgroups = false` makes none.

This host runs cgroup v1 (hybrid); the v2 layout is unit-tested (tests/unit/test_cgroups.py)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest

from nomad_vm.driver.checkpoints import PAUSE_AT, PAUSE_MARKER, START_STEPS
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.cgroups import cgroup_name, detect
from tests.conftest import (
    CGROUP_ROOT,
    processes_under,
    task_cgroups,
    vm_processes_under,
    wait_until,
)
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_cpu_pinning import vcpu_affinity
from tests.integration.test_ksm import fingerprint
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import RUNNING, destroy

pytestmark = pytest.mark.skipif(detect() != "v1", reason="the integration test runs on cgroup v1")

MB = 1024 * 1024
CONTROLLERS = ("cpu", "cpuset", "memory")


def cgroups_of(pid: int) -> dict[str, Path]:
    """The v1 cgroup directory of ``pid`` in each hierarchy we use, from the kernel's view
    (/proc/<pid>/cgroup: "4:cpu:/nomad-vm/<task>")."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller in CONTROLLERS:
                found[controller] = CGROUP_ROOT / controller / path.lstrip("/")
    return found


def procs(directory: Path) -> set[int]:
    return {int(p) for p in (directory / "cgroup.procs").read_text().split()}


def last_cpu(pid: int, tid: int) -> int:
    """The CPU the thread last ran on (field 39 of its stat, after the parenthesised name)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[36])  # fields from 3 (state) on


def test_the_vm_runs_in_its_cgroup_with_the_tasks_limits(
    plugin: PluginProcess, short_tmp: Path, tiny_guest  # type: ignore[no-untyped-def]
) -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="cg") as (cfg, fifo, alloc):
        (alloc / "tiny" / "local").mkdir()  # shared with the guest: a virtiofsd, a helper
        cfg.resources.linux_resources.cpuset_cpus = str(core)
        assert fingerprint(plugin)["driver.vm.cgroups"] == "v1"
        before = task_cgroups()
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            dirs = cgroups_of(qemu.pid)
            made = task_cgroups([short_tmp / "data"]) - before
            assert set(dirs.values()) == made and len(made) == 3, (dirs, made)
            assert all(d.parent.name == "nomad-vm" for d in made)
            assert (dirs["cpu"] / "cpu.shares").read_text().strip() == "500"
            assert (dirs["cpuset"] / "cpuset.cpus").read_text().strip() == str(core)
            (vcpu_name,) = vcpu_affinity(qemu)
            tcg = vcpu_name.endswith("/TCG")
            # 160 MB of guest RAM + 256 MB + 160/16 MB, + QEMU's 1 GiB translation cache (TCG).
            limit = (160 + 256 + 10 + (1024 if tcg else 0)) * MB
            assert int((dirs["memory"] / "memory.limit_in_bytes").read_text()) == limit
            used = int((dirs["memory"] / "memory.max_usage_in_bytes").read_text())
            print(f"QEMU's peak memory in its cgroup: {used // MB} MB (limit {limit // MB} MB)")
            helpers = processes_under(short_tmp, "virtiofsd")
            assert helpers
            for directory in dirs.values():
                assert {qemu.pid, *(h.pid for h in helpers)} <= procs(directory)
            # Every QEMU thread (they are created in the cgroup), and the vCPU only on the core.
            tasks = {int(t) for t in (dirs["cpu"] / "tasks").read_text().split()}
            assert {t.id for t in qemu.threads()} <= tasks
            assert vcpu_affinity(qemu) == {vcpu_name: str(core)}
            vcpu = next(t.id for t in qemu.threads() if _thread_name(qemu.pid, t.id) == vcpu_name)
            assert last_cpu(qemu.pid, vcpu) == core
        finally:
            destroy(plugin, cfg.id)
    assert not any(d.exists() for d in dirs.values()), dirs


def _thread_name(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()


def test_a_recovered_vm_keeps_its_cgroup_and_destroy_removes_it(
    short_tmp: Path, tiny_guest  # type: ignore[no-untyped-def]
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="rec") as (cfg, fifo, _):
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            dirs = cgroups_of(qemu.pid)
            assert first.process is not None
            first.process.send_signal(signal.SIGKILL)
            assert first.wait_exit(10) is not None
    finally:
        first.kill()
    second = PluginProcess([str(DRIVER)])
    second.start(short_tmp / "plugin2.stderr")
    try:
        configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
        handle.config.CopyFrom(cfg)
        recover(second, handle)
        assert cgroups_of(qemu.pid) == dirs
        assert all(qemu.pid in procs(d) for d in dirs.values())
        destroy(second, cfg.id)
        assert not psutil.pid_exists(qemu.pid) or qemu.status() == psutil.STATUS_ZOMBIE
        assert not any(d.exists() for d in dirs.values()), dirs
    finally:
        second.kill()


def test_cgroups_off_makes_none(
    plugin: PluginProcess, short_tmp: Path, tiny_guest  # type: ignore[no-untyped-def]
) -> None:
    options = {"cgroups": False}
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="off", plugin_options=options
    ) as (cfg, fifo, _):
        assert fingerprint(plugin)["driver.vm.cgroups"] == "off"
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            assert plugin.process is not None
            # QEMU stays where the plugin is.
            assert cgroups_of(qemu.pid) == cgroups_of(plugin.process.pid)
        finally:
            destroy(plugin, cfg.id)


@pytest.mark.parametrize("step", ["cgroup", "helpers-recorded", "vmm-recorded"])
def test_plugin_killed_around_the_cgroup_step_leaves_none(
    short_tmp: Path, tiny_guest, step: str  # type: ignore[no-untyped-def]
) -> None:
    """SIGKILL at the cgroup step (on record, not yet made) and later (made; the helper in it,
    the VMM recorded but not yet placed): DestroyTask by a fresh plugin removes it. (The
    crash tests of test_crash_safety.py run the plugin under `ip netns exec`, whose fresh /sys
    has no cgroup file system: there the plugin makes no cgroup.)"""
    marker = short_tmp / "paused"
    first = PluginProcess([str(DRIVER)], {PAUSE_AT: step, PAUSE_MARKER: str(marker)})
    first.start(short_tmp / "plugin1.stderr")
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="crash") as (cfg, _, alloc):
            (alloc / "tiny" / "local").mkdir()  # a virtiofsd: a helper spawned before the VMM
            outcome: list[object] = []

            def start() -> None:
                try:
                    outcome.append(drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg)))
                except Exception as exc:
                    outcome.append(exc)

            starter = threading.Thread(target=start)
            starter.start()
            assert wait_until(marker.exists, 120), outcome
            name = cgroup_name(cfg.id, str(short_tmp / "data"))
            made = [p for p in task_cgroups() if p.name == name]
            made_yet = START_STEPS.index(step) > START_STEPS.index("cgroup")
            assert len(made) == (3 if made_yet else 0), (step, made)
            if step == "vmm-recorded":
                helpers = {h.pid for h in processes_under(short_tmp, "virtiofsd")}
                assert helpers and all(helpers <= procs(d) for d in made)
            assert first.process is not None
            first.process.kill()
            assert first.wait_exit(10) is not None
            starter.join(30)
    finally:
        first.kill()
    second = PluginProcess([str(DRIVER)])
    second.start(short_tmp / "plugin2.stderr")
    try:
        configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
        destroy(second, cfg.id)
        assert wait_until(lambda: not vm_processes_under(short_tmp), 15)
        assert not [p for p in task_cgroups() if p.name == name]
    finally:
        second.kill()


def test_swtpm_runs_in_the_tasks_cgroup(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    # vmlinuz: an ELF vmlinux (QEMU's PVH entry) with a TPM is refused (test_windows_pieces).
    options = {"os": {"machine": "q35"}, "tpm": True, "kernel": str(tiny_guest.vmlinuz)}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="tpm", overrides=options) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            (qemu,) = processes_under(short_tmp, "qemu-system")
            # (QEMU's command line names swtpm's socket too.)
            (swtpm,) = [p for p in processes_under(short_tmp, "swtpm") if p.name() == "swtpm"]
            dirs = cgroups_of(qemu.pid)
            assert cgroups_of(swtpm.pid) == dirs and len(dirs) == 3
            assert all(d.parent.name == "nomad-vm" for d in dirs.values())
        finally:
            destroy(plugin, cfg.id)
    assert not any(d.exists() for d in dirs.values()), dirs

"""QEMU and virtiofsd run as the unprivileged ``vm_user`` with no_new_privs, QEMU sandboxed by
its own seccomp filter; the VM still boots, shares, is recovered by a new plugin process and
stops gracefully. The plugin's option names who they run as and whether QEMU is sandboxed.

The tiny guest has no 9p or virtio-fs driver: what a guest can do on a writable share as this
user (no setuid-root file, no device node) is checked with the Debian guest in
test_debian_task.py.
"""

from __future__ import annotations

import pwd
import signal
from pathlib import Path

import grpc
import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under, vm_processes_under
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_share_daemons import fingerprint_attributes
from tests.integration.test_vm_lifecycle import RUNNING, destroy, stop, wait, wait_until

pytestmark = pytest.mark.integration

VM_USER = "nomad-vm"  # the default, created by `make setup` (nomad-vm vm-user)


def status_of(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict of its fields."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def the_only(procs: list[psutil.Process]) -> psutil.Process:
    assert len(procs) == 1, procs
    return procs[0]


def assert_unprivileged(pid: int, seccomp: str) -> None:
    account = pwd.getpwnam(VM_USER)
    status = status_of(pid)
    assert status["Uid"].split() == [str(account.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(account.pw_gid)] * 4, status["Gid"]
    assert status["Groups"] == "", status["Groups"]  # no root group, no plugin groups
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == "0000000000000000", status["CapEff"]
    assert status["Seccomp"] == seccomp, status["Seccomp"]


def test_vm_runs_unprivileged_and_sandboxed_and_is_recovered(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second = None
    try:
        with tiny_task(
            first,
            short_tmp,
            tiny_guest,
            alloc_name="vm",
            plugin_options={"share_transport": "virtiofs"},
        ) as (cfg, fifo, alloc):
            # The allocation's directory is root's alone: the shared directories inside are
            # reached through the descriptors the plugin opened, not by path.
            alloc.chmod(0o700)
            # (the first fingerprint may predate the config: wait for one made with it)
            assert wait_until(lambda: "driver.vm.vm_user" in fingerprint_attributes(first), 10)
            attributes = fingerprint_attributes(first)
            assert attributes["driver.vm.vm_user"] == VM_USER
            assert attributes["driver.vm.seccomp"] == "true"
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
            assert fifo.wait_for(RUNNING, 120), bytes(fifo.data[-2000:])
            qemu = the_only(processes_under(short_tmp, "qemu-system"))
            assert_unprivileged(qemu.pid, seccomp="2")
            daemons = processes_under(short_tmp, "virtiofsd")
            assert daemons, "the task's directories are shared over virtio-fs"
            for daemon in daemons:
                assert_unprivileged(daemon.pid, seccomp="2")  # virtiofsd's own filter

            # A new plugin process (root) finds the unprivileged QEMU again and stops it.
            first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.wait_exit(5)
            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            recover(second, handle)
            inspected = drv(second).InspectTask(driver_pb2.InspectTaskRequest(task_id=cfg.id))
            assert inspected.task.state == driver_pb2.RUNNING
            stop(second, cfg.id, 60)  # the ACPI power button, sent over QMP
            result = wait(second, cfg.id)
            destroy(second, cfg.id)
        assert (result.result.exit_code, result.err) == (0, "")
        assert qemu.pid not in psutil.pids() or qemu.status() == psutil.STATUS_ZOMBIE
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert not vm_processes_under(short_tmp)


def test_seccomp_off_leaves_qemu_unfiltered_but_still_unprivileged(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    options = {"seccomp": False, "share_transport": "9p"}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="nosec", plugin_options=options) as (
        cfg,
        _,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            qemu = the_only(processes_under(short_tmp, "qemu-system"))
            assert_unprivileged(qemu.pid, seccomp="0")
            assert "-sandbox" not in qemu.cmdline()
        finally:
            stop(plugin, cfg.id, 1)
            wait(plugin, cfg.id)
            destroy(plugin, cfg.id)
    assert not vm_processes_under(short_tmp)


def test_an_unknown_vm_user_is_refused_naming_the_option(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    options = {"vm_user": "no-such-user-nv"}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="nouser", plugin_options=options) as (
        cfg,
        _,
        alloc,
    ):
        health = next(iter(drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())))
        assert health.health == driver_pb2.FingerprintResponse.UNHEALTHY
        assert "vm_user" in health.health_description and "useradd" in health.health_description
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert "config.vm_user" in str(err.value.details()), err.value.details()
        assert "no-such-user-nv" in str(err.value.details())
        assert not list((alloc / "tiny").glob("nomad-vm-*"))
    assert not vm_processes_under(short_tmp)
    assert not list((short_tmp / "data" / "journal").glob("*"))

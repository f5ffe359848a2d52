"""A Cloud Hypervisor task in Nomad's group network mode, in-process through the driver: the
TAP lives in the allocation's namespace, and the VMM (the fake cloud-hypervisor executable) is
started there, where it finds the TAP by name, as CH would. Stop and destroy leave nothing,
in the namespace or outside it. A test of our backend, not of CH.

This host's /dev/net/tun is root's alone (mode 600, a container's; Debian makes it 666), so an
unprivileged CH could not attach to any TAP here: the namespace test runs CH as root
(``vm_user = "root"``), and the refusal as vm_user is checked on its own. That the TAP is
made vm_user's (so that, where /dev/net/tun is 666, CH attaches to it unprivileged) is checked
with a real TAP."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.network_plan import GROUP_BRIDGE
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.errors import LaunchError
from nomad_vm.network import taps
from nomad_vm.vm.cloud_hypervisor import vmm_files
from nomad_vm.vm.registry import BUILT_IN, HypervisorRegistry
from nomad_vm.vm.vmm_user import resolve_vmm_user
from tests.conftest import processes_under
from tests.fakes.cloud_hypervisor import FAKE_CH, wrapper
from tests.netns import ip, isolated_namespaces

pytestmark = pytest.mark.integration


@pytest.fixture
def alloc_netns() -> Iterator[str]:
    with isolated_namespaces((GROUP_BRIDGE, "nvt")) as spaces:
        yield f"/run/netns/{spaces.new()}"


def test_the_vmm_runs_in_the_allocations_namespace_and_finds_its_tap(
    alloc_netns: str, short_tmp: Path, tiny_guest: object
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\0" * 512)
    driver = VMDriver(backends=HypervisorRegistry(BUILT_IN, default="qemu"))
    block = {"bin": str(wrapper(short_tmp / "cloud-hypervisor")), "trust_kvm": True}
    driver.set_config(
        {
            "data_dir": str(short_tmp / "data"),
            "image_paths": [str(images)],
            "cloud_hypervisor": block,
            "vm_user": "root",
        },
        None,
    )
    alloc = short_tmp / "alloc"
    (alloc / "alloc" / "logs").mkdir(parents=True)
    (alloc / "vm").mkdir()
    console = alloc / "alloc" / "logs" / "vm.stdout"
    console.touch()
    task = TaskConfig(
        id="a/vm/1",
        name="vm",
        alloc_id="a",
        alloc_dir=str(alloc),
        stdout_path=str(console),
        stderr_path="",
        resources=TaskResources(cpu_mhz=500, memory_mb=128),
        driver_config={
            "hypervisor": "cloud-hypervisor",
            "kernel": str(images / "vmlinux"),
            "share_task_dirs": False,
            "network_interface": {"bridge": {}},
        },
        netns_path=alloc_netns,
    )

    async def scenario() -> None:
        await driver.start_task(task)
        journal = JournalStore(short_tmp / "data").load(task.id)
        assert journal is not None and journal.vmm is not None and journal.network is not None
        assert journal.network.netns == alloc_netns
        vmm_ns = os.stat(f"/proc/{journal.vmm.pid}/ns/net").st_ino
        assert vmm_ns == os.stat(alloc_netns).st_ino
        assert vmm_ns != os.stat("/proc/self/ns/net").st_ino
        await driver.stop_task(task.id, 10, "SIGTERM")
        result = await driver.wait_task(task.id)
        await driver.destroy_task(task.id, force=False)
        assert (result.exit_code, result.err) == (0, ""), result

    asyncio.run(scenario())
    assert not processes_under(short_tmp, FAKE_CH)
    assert JournalStore(short_tmp / "data").load(task.id) is None


def test_the_tap_becomes_vm_users_and_an_unusable_tun_device_is_refused_naming_it(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = resolve_vmm_user("nomad-vm")
    assert user is not None
    with isolated_namespaces(("nvtc",)) as spaces:
        ns = spaces.new()
        ip("-n", ns, "link", "add", "nvtcbr0", "type", "bridge")
        taps.create_tap("nvtctap0", "nvtcbr0", netns=ns)
        tap_fd = taps.open_tap("nvtctap0", netns=ns)
        try:
            vmm_files._own_tap(tap_fd, "nvtctap0", user)
            # The kernel's own record of who may attach without CAP_NET_ADMIN.
            owner = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", "/sys/class/net/nvtctap0/owner"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert owner == str(user.uid)
        finally:
            os.close(tap_fd)
    closed = short_tmp / "tun"
    closed.touch(mode=0o600)
    monkeypatch.setattr(vmm_files, "TUN_DEVICE", closed)
    with pytest.raises(LaunchError) as refused:
        vmm_files._check_tun(user)
    assert "vm_user nomad-vm may not open" in str(refused.value)
    assert "mode 600" in str(refused.value)
    closed.chmod(0o666)
    vmm_files._check_tun(user)

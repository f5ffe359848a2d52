"""SIGKILL the real plugin process at each step of StartTask; Nomad's usual follow-up calls to a
fresh plugin must leave nothing behind: no process, TAP, rule, lease, directory or file.

The plugin is paused at a step by its test hook (``NOMAD_VM_TEST_PAUSE_AT``, see
``nomad_vm.driver.checkpoints``): the step's host change is in the journal, not yet made
(``helpers-spawned``, ``vmm-spawned``: virtiofsd, then QEMU, are forked but not yet recorded,
waiting at their gate). Nomad never got StartTask's answer, so it only calls DestroyTask with
the task id; after the answer it has a handle, and calls RecoverTask, StopTask and DestroyTask.
The task takes every step: a disk image (so a cloud-init seed), UEFI (its variable store), the
task dirs shared over virtio-fs (a virtiofsd each) and a NIC on the plugin's bridge with a
forwarded port. With Cloud Hypervisor (the backend driving the fake `cloud-hypervisor`
executable: a test of our code, not of CH) the task boots its kernel directly, so there is no
UEFI variable store step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nomad_vm.driver.checkpoints import PAUSE_AT, PAUSE_MARKER, START_STEPS
from nomad_vm.network.names import tap_name
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under, vm_processes_under
from tests.fakes.cloud_hypervisor import FAKE_CH, wrapper
from tests.integration.pluginkit import configure, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import stop, wait, wait_until
from tests.integration.test_vm_network import (
    GUEST_PORT,
    TAP_PREFIX,
    NetHost,
    bridge_nic,
    forward,
    network_block,
)
from tests.integration.test_vm_network import host as host

pytestmark = pytest.mark.integration

ANSWERED = "answered"


@pytest.fixture
def disk_image(short_tmp: Path) -> Path:
    images = short_tmp / "images"
    images.mkdir()
    image = images / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    return image


def every_step(image: Path) -> dict[str, object]:
    return {
        "image": str(image),
        "firmware": "uefi",
        "network_interface": bridge_nic(("http",)),
    }


def runtime_dirs(alloc: Path) -> list[Path]:
    return list((alloc / "tiny").glob("nomad-vm-*")) + list(alloc.parent.glob("data/run/*"))


@pytest.fixture
def paused_plugin(host: NetHost) -> Iterator[NetHost]:
    """The fixture's plugin is replaced by one that pauses where the test says."""
    assert host.plugin is not None
    host.plugin.kill()
    yield host


def ch_options(root: Path) -> dict[str, object]:
    fake = wrapper(root / "cloud-hypervisor")
    return {
        "hypervisor": "cloud-hypervisor",
        "cloud_hypervisor": {"bin": str(fake), "trust_kvm": True},
        # The task has a NIC, and this host's /dev/net/tun is root's alone (mode 600): an
        # unprivileged CH could not attach to its TAP (test_ch_group_network.py checks that
        # refusal; test_ch_unprivileged.py the rest of vm_user).
        "vm_user": "root",
    }


@pytest.mark.parametrize("hypervisor", ["qemu", "cloud-hypervisor"])
@pytest.mark.parametrize("step", [*START_STEPS, ANSWERED])
def test_plugin_killed_at_each_start_step_leaves_nothing(
    paused_plugin: NetHost, tiny_guest: Any, disk_image: Path, step: str, hypervisor: str
) -> None:
    ch = hypervisor == "cloud-hypervisor"
    if ch and step == "firmware-vars":
        pytest.skip("Cloud Hypervisor boots the kernel directly: no UEFI variable store")
    if step == "cgroup":
        # `ip netns exec` mounts a fresh /sys without the cgroup file systems: the plugin makes
        # no cgroup there. test_cgroups.py kills a plugin (outside a netns) at and after it.
        pytest.skip("no cgroup file system under ip netns exec")
    host = paused_plugin
    marker = host.root / "paused"
    env = {} if step == ANSWERED else {PAUSE_AT: step, PAUSE_MARKER: str(marker)}
    first = host.start_plugin(env)
    options: dict[str, object] = {"network": network_block()}
    overrides = every_step(disk_image)
    if ch:
        options.update(ch_options(host.root))
        del overrides["firmware"]
    image_paths = [str(tiny_guest.vmlinux.parent), str(disk_image.parent)]
    with tiny_task(
        first,
        host.root,
        tiny_guest,
        alloc_name="crash",
        overrides=overrides,
        image_paths=image_paths,
        plugin_options=options,
    ) as (cfg, _, alloc):
        forward(cfg, "http", 20080, GUEST_PORT)
        (alloc / "tiny" / "local").mkdir()  # shared with the guest: a virtiofsd
        starter, outcome = host.start_in_background(cfg)
        if step == ANSWERED:
            starter.join(120)
            assert isinstance(outcome[0], driver_pb2.StartTaskResponse), outcome
        else:
            assert wait_until(marker.exists, 120), (outcome, host.observe())
        assert first.process is not None
        first.process.kill()  # SIGKILL: no clean-up of any kind
        assert first.wait_exit(10) is not None
        starter.join(30)
        if step != ANSWERED:
            assert isinstance(outcome[0], grpc.RpcError), outcome
            assert host.records(), "the journal must outlive the plugin"

        second = host.start_plugin()
        configure(second, host.data_dir, image_paths, **options)
        if step == ANSWERED:
            reply = outcome[0]
            assert isinstance(reply, driver_pb2.StartTaskResponse)
            reply.handle.config.CopyFrom(cfg)
            recover(second, reply.handle)
            stop(second, cfg.id, 1)
            wait(second, cfg.id)
        host.destroy(cfg.id)

        # Gated processes of a plugin killed before recording them end by themselves.
        assert wait_until(lambda: not vm_processes_under(host.root), 15), [
            p.cmdline() for p in vm_processes_under(host.root)
        ]
        assert not processes_under(host.root, "/bin/sh")
        assert wait_until(lambda: not processes_under(host.root, FAKE_CH), 15)
        host.assert_clean()
        assert tap_name(TAP_PREFIX, cfg.id) not in host.taps()
        assert not runtime_dirs(alloc), runtime_dirs(alloc)
        assert not (host.data_dir / "journal").exists()

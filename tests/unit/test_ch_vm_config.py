"""Cloud Hypervisor's VM definition for each kind of spec, compared with golden JSON files in
tests/unit/golden/ (UPDATE_GOLDEN=1 rewrites them), and checked against the typed model of CH's
API: every document we send reads back, strictly, as the value it came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.accel import AcceleratorChoice
from nomad_vm.vm.cloud_hypervisor.model import (
    ConsoleMode,
    ImageType,
    ModelError,
    VmConfig,
    VmInfo,
    VmState,
    from_json,
    to_json,
)
from nomad_vm.vm.cloud_hypervisor.vm_config import CloudHypervisorPlan, build_vm_config, vmm_argv
from nomad_vm.vm.request import LaunchDevices, VMPlan, VMRequest
from nomad_vm.vm.share_transport import ShareTransport
from nomad_vm.vm.spec import DiskSpec, NicSpec, ShareSpec

GOLDEN = Path(__file__).parent / "golden"
RUN = Path("/run/t")


def _plan(
    kernel: bool = True,
    shares: tuple[ShareSpec, ...] = (),
    memory_mb: int = 512,
    free_page_reporting: bool = False,
) -> VMPlan:
    request = VMRequest(
        name="web-1",
        vcpus=2,
        memory_mb=memory_mb,
        arch="x86_64",
        machine="cloud-hypervisor",
        firmware="bios" if kernel else "uefi",
        kernel=Path("/img/vmlinux") if kernel else None,
        initramfs=Path("/img/initramfs.img") if kernel else None,
        cmdline="console=ttyS0 root=/dev/vda1" if kernel else "",
        has_disk=True,
        shares=shares,
        free_page_reporting=free_page_reporting,
    )
    details = CloudHypervisorPlan("/usr/bin/cloud-hypervisor", None, "true", None)
    transport = ShareTransport("virtiofs", Path("/usr/libexec/virtiofsd"), "test")
    accel = AcceleratorChoice("kvm", "test")
    return VMPlan("cloud-hypervisor", request, RUN, accel, transport, shares, details)


SHARES = (
    ShareSpec("alloc", Path("/a/alloc"), "/alloc", False, RUN / "vfs0.sock"),
    ShareSpec("local", Path("/a/t/local"), "/local", True, RUN / "vfs1.sock"),
)
OVERLAY = DiskSpec(HeldFile(RUN / "disk.qcow2", 20, True), "qcow2")
SEED = HeldFile(RUN / "cidata.iso", 21, False)
# CH reopens what it inherited by these names (vmm_files): it runs as vm_user.
KERNEL = HeldFile(Path("/img/vmlinux"), 30)
INITRAMFS = HeldFile(Path("/img/initramfs.img"), 31)
FIRMWARE_FD = "/proc/self/fd/24"


def _booting(*devices: object) -> LaunchDevices:
    """The devices of a VM that boots the kernel (the plan's), as the driver hands them."""
    return LaunchDevices(*devices, kernel=KERNEL, initramfs=INITRAMFS)  # type: ignore[arg-type]


CASES = {
    "kernel_only": (_plan(), _booting(1), None),
    "disk_kernel_seed_tap": (
        # The task's free_page_reporting reaches the balloon (off in the other cases).
        _plan(free_page_reporting=True),
        _booting(1, OVERLAY, SEED, (NicSpec("nvm0123abcd", "52:54:00:12:34:56"),)),
        None,
    ),
    "firmware_raw_disk": (
        _plan(kernel=False),
        LaunchDevices(1, DiskSpec(HeldFile(RUN / "disk.raw", 22, True), "raw"), SEED),
        FIRMWARE_FD,
    ),
    "virtiofs": (_plan(shares=SHARES), _booting(1, OVERLAY, SEED), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vm_config_matches_golden(name: str) -> None:
    plan, devices, firmware = CASES[name]
    config = build_vm_config(plan, firmware, devices)
    rendered = json.dumps(to_json(config), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / f"ch_{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run with UPDATE_GOLDEN=1 to accept: {golden}"
    # What we send is what the model (strictly) reads back.
    assert from_json(VmConfig, json.loads(rendered), strict=True) == config


def test_shares_make_guest_memory_shared_and_each_gets_its_socket() -> None:
    config = build_vm_config(_plan(shares=SHARES), None, _booting(1))
    assert config.memory is not None and config.memory.shared
    assert config.fs is not None
    # Named in CH's working directory, where the plugin bound them (CH cannot reach RUN).
    assert [(f.tag, f.socket) for f in config.fs] == [
        ("alloc", "vfs0.sock"),
        ("local", "vfs1.sock"),
    ]
    plain = build_vm_config(_plan(), None, _booting(1))
    assert plain.memory is not None and not plain.memory.shared and plain.fs is None


def test_memory_vcpus_console_and_devices() -> None:
    config = build_vm_config(_plan(memory_mb=160), None, _booting(1, OVERLAY, SEED))
    assert config.memory is not None and config.memory.size == 160 * 1024 * 1024
    assert config.cpus is not None and (config.cpus.boot_vcpus, config.cpus.max_vcpus) == (2, 2)
    # The serial port is the VMM's stdout (the task's); no virtio-console.
    assert config.serial is not None and config.serial.mode is ConsoleMode.TTY
    assert config.console is not None and config.console.mode is ConsoleMode.OFF
    assert config.pvpanic and config.rng is not None and config.balloon is not None
    assert config.disks is not None
    disk, seed = config.disks
    # A qcow2 overlay names its backing file: CH follows it only when told.
    assert (disk.image_type, disk.backing_files, disk.readonly) == (ImageType.QCOW2, True, False)
    assert (seed.image_type, seed.backing_files, seed.readonly) == (ImageType.RAW, False, True)
    # Every file by the descriptor CH inherits, never the path it had.
    assert (disk.path, seed.path) == ("/proc/self/fd/20", "/proc/self/fd/21")
    assert config.payload.kernel == "/proc/self/fd/30"
    assert config.payload.initramfs == "/proc/self/fd/31"


def test_a_vm_without_kernel_needs_the_firmware() -> None:
    with pytest.raises(ValueError, match="firmware"):
        build_vm_config(_plan(kernel=False), None, LaunchDevices(1, OVERLAY))
    with pytest.raises(ValueError, match="vmdk"):
        build_vm_config(
            _plan(), None, _booting(1, DiskSpec(HeldFile(RUN / "d.vmdk", 23, True), "vmdk"))
        )


def test_vmm_argv_defines_no_vm_and_keeps_the_vmm_after_power_off() -> None:
    details = CloudHypervisorPlan("/usr/bin/cloud-hypervisor", None, "log", None)
    # Both are descriptors the plugin made: CH, as vm_user, could not reach the runtime dir.
    assert vmm_argv(details, 5, 6) == [
        "/usr/bin/cloud-hypervisor",
        "--api-socket",
        "fd=5",
        "--event-monitor",
        "fd=6",
        "--seccomp",
        "log",
        "--no-shutdown",
    ]


@pytest.mark.parametrize(
    ("document", "path", "says"),
    [
        ({}, "payload", "required"),
        ({"payload": {}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}}, "cpus.boot_vcpus", "least"),
        ({"payload": {}, "memory": {"size": "1G"}}, "memory.size", "integer"),
        ({"payload": {}, "serial": {"mode": "tty"}}, "serial.mode", "one of"),
        ({"payload": {}, "disks": [{"path": "/d", "readonly": "yes"}]}, "disks[0].readonly", ""),
        ({"payload": {"kernal": "/k"}}, "payload.kernal", "not a property"),
        ({"payload": {}, "net": {"tap": "x"}}, "net", "array"),
    ],
)
def test_the_model_names_what_is_wrong(document: dict[str, object], path: str, says: str) -> None:
    with pytest.raises(ModelError) as caught:
        from_json(VmConfig, document, strict=True)
    assert caught.value.path == path and says in str(caught.value)


def test_replies_are_read_leniently() -> None:
    """CH's vm.info carries much more than we model (device tree, defaults of every option)."""
    reply = {
        "config": {
            "payload": {"kernel": "/k"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": False},
            "iommu": False,
        },
        "state": "Running",
        "memory_actual_size": 536870912,
        "device_tree": {"_disk0": {"id": "_disk0"}},
    }
    info = from_json(VmInfo, reply, strict=False)
    assert info.state is VmState.RUNNING and info.config.payload.kernel == "/k"
    with pytest.raises(ModelError):
        from_json(VmInfo, reply, strict=True)

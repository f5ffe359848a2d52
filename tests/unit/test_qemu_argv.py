"""The QEMU command line for a VMSpec, compared with golden files in tests/unit/golden/."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.machine import MachineConfig
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.files_argv import inherited_fds
from nomad_vm.vm.spec import DiskSpec, NicSpec, ShareSpec, VMSpec

GOLDEN = Path(__file__).parent / "golden"


# Debian's OVMF with Microsoft's keys enrolled (the firmware of `uefi-secure`).
SECURE_BOOT = FirmwarePlan(
    "uefi-secure",
    Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
    Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    True,
    True,
    "test",
)


def held(path: str, fd: int, writable: bool = False) -> HeldFile:
    """A descriptor as the driver would pass it (never opened here: argv is pure)."""
    return HeldFile(Path(path), fd, writable)


def disk(path: str, fd: int, *backing: tuple[HeldFile, str]) -> DiskSpec:
    return DiskSpec(held(path, fd, writable=True), "qcow2", tuple(backing))


SPECS = {
    "kernel_tcg": VMSpec(
        name="web-1a2b3c4d",
        vcpus=2,
        memory_mb=256,
        kernel=held("/img/vmlinux", 20),
        initramfs=held("/img/initramfs.img", 21),
        cmdline="console=ttyS0 quiet",
        accelerator="tcg",
        control_socket=Path("/alloc/web/nomad-vm/qmp.sock"),
    ),
    "kernel_only_kvm": VMSpec(
        name="db-00000000",
        vcpus=1,
        memory_mb=128,
        kernel=held("/img/bzImage", 20),
        initramfs=None,
        cmdline="",
        accelerator="kvm",
        control_socket=Path("/run/x/qmp.sock"),
    ),
    "disk_uefi_secure_q35": VMSpec(
        name="win-0000aaaa",
        vcpus=2,
        memory_mb=2048,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/alloc/win/nomad-vm-x/qmp.sock"),
        # A copy: no backing chain.
        disk=disk("/alloc/win/nomad-vm-x/disk.qcow2", 30),
        machine=MachineConfig("q35", "uefi-secure", smm=True),
        firmware=SECURE_BOOT,
        firmware_code=held(str(SECURE_BOOT.code), 40),
        firmware_vars=held("/alloc/win/nomad-vm-x/uefi-vars.fd", 41, writable=True),
        seed=held("/alloc/win/nomad-vm-x/cidata.iso", 31),
        agent_socket=Path("/alloc/win/nomad-vm-x/agent.sock"),
        shares=(
            ShareSpec("nomad-local", Path("/alloc/win/local"), "/local", True),
            ShareSpec("nomad-vol0", Path("/srv/data,1"), "/data", False),
        ),
    ),
    "microvm_disk": VMSpec(
        name="micro-1",
        vcpus=1,
        memory_mb=128,
        kernel=held("/img/vmlinux", 20),
        initramfs=None,
        cmdline="console=ttyS0 root=/dev/vda",
        accelerator="tcg",
        control_socket=Path("/run/m/qmp.sock"),
        # A thin copy of a qcow2 on a raw base: the chain explicit, nearest first.
        disk=disk(
            "/run/m/di,sk.qcow2",
            30,
            (held("/img/mid.qcow2", 32), "qcow2"),
            (held("/img/base,1.raw", 33), "raw"),
        ),
        machine=MachineConfig("microvm", "bios", smm=None),
    ),
    # virtio-fs: RAM from a shared memfd, one vhost-user-fs device per virtiofsd socket.
    "disk_virtiofs": VMSpec(
        name="files-1",
        vcpus=1,
        memory_mb=512,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/v/qmp.sock"),
        disk=disk("/run/v/disk.qcow2", 30, (held("/img/debian.qcow2", 32), "qcow2")),
        agent_socket=Path("/run/v/agent.sock"),
        shares=(
            ShareSpec(
                "nomad-local", Path("/alloc/a/local"), "/local", True, Path("/run/v/vfs0.sock")
            ),
            ShareSpec("nomad-vol0", Path("/srv/d"), "/data", False, Path("/run/v/vfs1.sock")),
        ),
        share_transport="virtiofs",
    ),
    # Bridge networking: the driver made the TAP; QEMU only opens it.
    "disk_bridge_nic": VMSpec(
        name="web-2",
        vcpus=1,
        memory_mb=512,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/n/qmp.sock"),
        disk=disk("/run/n/disk.qcow2", 30, (held("/img/base.raw", 32), "raw")),
        nics=(NicSpec("nvmabcdefghijkl", "52:54:12:34:56:78", 50),),
    ),
    # As launched for an unprivileged QEMU: sandboxed; QMP, agent, vhost-user, shared
    # directories and the TAP all as descriptors the driver opened (no path QEMU must reach).
    "handed_descriptors_sandboxed": VMSpec(
        name="safe-1",
        vcpus=1,
        memory_mb=512,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/s/qmp.sock"),
        disk=disk("/run/s/disk.qcow2", 30),
        agent_socket=Path("/run/s/agent.sock"),
        shares=(
            ShareSpec("nomad-alloc", Path("/alloc/s/alloc"), "/alloc", False, None, None, 11),
            ShareSpec("nomad-vol0", Path("/srv/d"), "/data", True, None, None, 12),
        ),
        nics=(NicSpec("nvmabcdefghijkl", "52:54:12:34:56:78", 13),),
        control_fd=9,
        agent_fd=10,
        serial_socket=Path("/run/s/serial.sock"),
        serial_fd=16,
        console_log_fd=17,
        seccomp=True,
    ),
    "handed_virtiofs": VMSpec(
        name="safe-2",
        vcpus=1,
        memory_mb=512,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/t/qmp.sock"),
        shares=(
            ShareSpec(
                "nomad-local", Path("/a/local"), "/local", True, Path("/run/t/vfs0.sock"), 14, 15
            ),
        ),
        share_transport="virtiofs",
        control_fd=9,
        serial_socket=Path("/run/t/serial.sock"),
        serial_fd=16,
        console_log_fd=17,
        seccomp=True,
    ),
    # `disk` blocks: a primary overlay with a serial, then every bus pc has, a raw read-only
    # disk, an unsafe-cache one and a cdrom; each its own descriptor.
    "several_disks_every_bus_pc": VMSpec(
        name="disks-1",
        vcpus=1,
        memory_mb=512,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/d/qmp.sock"),
        disk=replace(
            disk("/run/d/disk.qcow2", 30, (held("/img/base.qcow2", 31), "qcow2")), serial="root"
        ),
        extra_disks=(
            DiskSpec(held("/run/d/disk1.raw", 32), "raw", serial="data-ro"),
            DiskSpec(held("/run/d/disk2.qcow2", 33, True), "qcow2", bus="sata", cache="unsafe"),
            DiskSpec(
                held("/run/d/disk3.qcow2", 34, True), "qcow2", bus="scsi", cache="writethrough"
            ),
            DiskSpec(held("/run/d/disk4.qcow2", 35, True), "qcow2", bus="ide"),
            DiskSpec(held("/run/d/disk5.qcow2", 36), "qcow2", bus="ide", kind="cdrom"),
            DiskSpec(held("/run/d/disk6.qcow2", 37), "qcow2", bus="sata", kind="cdrom"),
        ),
        seccomp=True,
    ),
    # microvm: virtio-blk and virtio-scsi on virtio-mmio.
    "several_disks_microvm": VMSpec(
        name="disks-2",
        vcpus=1,
        memory_mb=256,
        kernel=held("/k/vmlinux", 20),
        initramfs=None,
        cmdline="console=ttyS0",
        accelerator="tcg",
        control_socket=Path("/run/m/qmp.sock"),
        machine=MachineConfig(machine="microvm", firmware="bios", smm=None),
        extra_disks=(
            DiskSpec(held("/run/m/disk0.qcow2", 30, True), "qcow2", serial="scratch"),
            DiskSpec(held("/run/m/disk1.qcow2", 31, True), "qcow2", bus="scsi"),
        ),
    ),
}
# KSM (the plugin's `ksm { enabled }`): private RAM marked mergeable; with virtio-fs the shared
# memfd backend says merge=on too, though the kernel never merges a shared mapping.
SPECS["kernel_tcg_ksm"] = replace(SPECS["kernel_tcg"], mem_merge=True)
SPECS["handed_virtiofs_ksm"] = replace(SPECS["handed_virtiofs"], mem_merge=True)
# The task's `free_page_reporting`: on the balloon, on PCI and on microvm's virtio-mmio.
SPECS["kernel_tcg_free_page_reporting"] = replace(SPECS["kernel_tcg"], free_page_reporting=True)
# The task's `hugepages`: a hugetlb memfd as the guest's RAM (shared too with virtio-fs).
SPECS["kernel_tcg_hugepages"] = replace(SPECS["kernel_tcg"], hugepages=True)
SPECS["handed_virtiofs_hugepages_ksm"] = replace(
    SPECS["handed_virtiofs"], hugepages=True, mem_merge=True
)
# Nomad's `memory_max`: a virtio-mem region above the boot memory (qemu/memory_argv.py),
# private anonymous memory; with virtio-fs, huge pages and KSM, matching the boot RAM.
SPECS["kernel_tcg_memory_max"] = replace(SPECS["kernel_tcg"], memory_max_mb=768)
SPECS["handed_virtiofs_hugepages_ksm_memory_max"] = replace(
    SPECS["handed_virtiofs_hugepages_ksm"], memory_max_mb=1024
)
SPECS["microvm_free_page_reporting"] = replace(SPECS["microvm_disk"], free_page_reporting=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_argv_matches_golden(name: str) -> None:
    rendered = "\n".join(qemu_argv("qemu-system-x86_64", SPECS[name])) + "\n"
    golden = GOLDEN / f"qemu_{name}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run with UPDATE_GOLDEN=1 to accept: {golden}"


def test_qemu_inherits_exactly_the_descriptors_its_command_line_names() -> None:
    spec = SPECS["disk_uefi_secure_q35"]
    assert sorted(inherited_fds(spec)) == [30, 31, 40, 41]
    argv = qemu_argv("qemu-system-x86_64", spec)
    assert [a for a in argv if a.startswith("fd=")] == [
        "fd=40,set=1",
        "fd=41,set=2",
        "fd=30,set=3",
        "fd=31,set=4",
    ]
    chain = SPECS["microvm_disk"]
    assert sorted(inherited_fds(chain)) == [20, 30, 32, 33]


def test_serial_console_is_a_handed_socket_logged_to_the_task_stdout() -> None:
    """The console is read-write on the socket the plugin bound; QEMU copies the guest's
    output to the task's stdout (an fdset of the FIFO's descriptor) whether or not anyone is
    attached. Both descriptors are inherited, and no path is named."""
    spec = SPECS["handed_virtiofs"]
    argv = qemu_argv("qemu-system-x86_64", spec)
    chardev = argv[argv.index("-add-fd", 0) :]
    assert chardev[:4] == ["-add-fd", "fd=17,set=1", "-chardev", chardev[3]]
    assert chardev[3] == (
        "socket,id=serial0,fd=16,server=on,wait=off,logfile=/dev/fdset/1,logappend=on"
    )
    assert {16, 17} <= set(inherited_fds(spec))
    assert not any("serial.sock" in arg for arg in argv)
    # Without a handed socket (no descriptors): stdio, output only, as before.
    plain = qemu_argv("qemu-system-x86_64", SPECS["kernel_tcg"])
    assert plain[plain.index("-chardev") + 1] == "stdio,id=serial0,signal=off"
    with pytest.raises(ValueError, match="console log"):
        qemu_argv("qemu-system-x86_64", replace(spec, console_log_fd=None))


def test_qemu_is_given_no_file_by_name() -> None:
    """Every file QEMU reads or writes is a descriptor: no image, kernel or firmware path."""
    for name, spec in SPECS.items():
        argv = qemu_argv("qemu-system-x86_64", spec)
        for arg in argv:
            for path in ("/img/", "/usr/share/OVMF", ".qcow2", ".iso", ".fd", ".raw"):
                assert path not in arg, (name, arg)

"""The QEMU command line for a VMSpec, compared with golden files in tests/unit/golden/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.machine import MachineConfig
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.spec import DiskSpec, NicSpec, ShareSpec, VMSpec

GOLDEN = Path(__file__).parent / "golden"

SPECS = {
    "kernel_tcg": VMSpec(
        name="web-1a2b3c4d",
        vcpus=2,
        memory_mb=256,
        kernel=Path("/img/vmlinux"),
        initramfs=Path("/img/initramfs.img"),
        cmdline="console=ttyS0 quiet",
        accelerator="tcg",
        control_socket=Path("/alloc/web/nomad-vm/qmp.sock"),
    ),
    "kernel_only_kvm": VMSpec(
        name="db-00000000",
        vcpus=1,
        memory_mb=128,
        kernel=Path("/img/bzImage"),
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
        disk=DiskSpec(Path("/alloc/win/nomad-vm-x/disk.qcow2"), "qcow2"),
        machine=MachineConfig("q35", "uefi-secure", smm=True),
        firmware=FirmwarePlan(
            "uefi-secure",
            Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
            Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
            True,
            True,
            "test",
        ),
        firmware_vars=Path("/alloc/win/nomad-vm-x/uefi-vars.fd"),
        seed=Path("/alloc/win/nomad-vm-x/cidata.iso"),
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
        kernel=Path("/img/vmlinux"),
        initramfs=None,
        cmdline="console=ttyS0 root=/dev/vda",
        accelerator="tcg",
        control_socket=Path("/run/m/qmp.sock"),
        disk=DiskSpec(Path("/run/m/di,sk.qcow2"), "qcow2"),  # a comma must be escaped
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
        disk=DiskSpec(Path("/run/v/disk.qcow2"), "qcow2"),
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
        disk=DiskSpec(Path("/run/n/disk.qcow2"), "qcow2"),
        nics=(NicSpec("nvmabcdefghijkl", "52:54:12:34:56:78"),),
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
        disk=DiskSpec(Path("/run/s/disk.qcow2"), "qcow2"),
        agent_socket=Path("/run/s/agent.sock"),
        shares=(
            ShareSpec("nomad-alloc", Path("/alloc/s/alloc"), "/alloc", False, None, None, 11),
            ShareSpec("nomad-vol0", Path("/srv/d"), "/data", True, None, None, 12),
        ),
        nics=(NicSpec("nvmabcdefghijkl", "52:54:12:34:56:78", 13),),
        control_fd=9,
        agent_fd=10,
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
        seccomp=True,
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_argv_matches_golden(name: str) -> None:
    rendered = "\n".join(qemu_argv("qemu-system-x86_64", SPECS[name])) + "\n"
    golden = GOLDEN / f"qemu_{name}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run with UPDATE_GOLDEN=1 to accept: {golden}"

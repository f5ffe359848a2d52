"""UEFI firmware boots the Debian test guest from SATA disks, with no kernel given to QEMU.

What a Windows guest does at every boot (`os { variant = "win11" }` puts its disks on SATA):
OVMF finds an EFI System Partition on a disk behind our AHCI controller, loads the boot loader
from it, and the loader's OS mounts its root from another SATA disk. The Windows test
(test_windows_debian.py) boots a `kernel` the plugin hands QEMU; this one gives none.

The Debian test image is a bare ext4 file system made bootable for BIOS (extlinux), with no
EFI System Partition, so the test makes one: a FAT disk (made by QEMU's vvfat and converted to
a raw image) holding the guest's own kernel, whose EFI stub is the boot loader, and its
initrd with the AHCI modules added (tests/sata_initrd.py), started by a boot entry in the
task's UEFI variable store (as Windows Setup writes one for bootmgfw.efi). The QEMU command
line is the driver's own (nomad_vm.vm.qemu.argv for a VMSpec with two `bus_type = "sata"`
disks on q35 with `firmware = "uefi"`), run directly: no plugin, no Nomad. One boot.

Needs: Debian ovmf, the PyPI package virt-firmware (a dev dependency).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

from nomad_vm.storage.held import FileHolder, open_own
from nomad_vm.vm.firmware import FirmwarePlan, plan_firmware, prepare_vars
from nomad_vm.vm.machine import validate_machine
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.files_argv import inherited_fds
from nomad_vm.vm.spec import DiskSpec, VMSpec
from tests.conftest import guest_cache
from tests.console import run_qemu
from tests.integration.test_firmware_boot import BOOT_TIMEOUT, QEMU, _run
from tests.sata_initrd import build_sata_initrd

pytestmark = pytest.mark.integration

# The boot loader and initrd on the ESP, as the boot entry names them.
LOADER, INITRD = "linux.efi", "initrd.img"


def uefi_plan_with_boot_entry(dest: Path, entry: str) -> FirmwarePlan:
    """`uefi` (OVMF without Secure Boot) whose VARS template starts ``entry`` (``\\file
    options``) first: a relative file path, which OVMF looks for on every file system."""
    plan = plan_firmware("uefi")
    assert plan is not None
    argv = [sys.executable, "-m", "virt.firmware.vars", "-i", str(plan.vars_template)]
    _run([*argv, "-o", str(dest), "--append-boot-filepath", entry])
    return dataclasses.replace(plan, vars_template=dest)


def make_esp(files: dict[str, Path], work: Path) -> Path:
    """A raw disk with one FAT partition (MBR) holding ``files``: QEMU's vvfat view of a
    directory, converted into an ordinary image the guest may write to."""
    tree = work / "esp"
    tree.mkdir()
    for name, source in files.items():
        shutil.copyfile(source, tree / name)
    image = work / "esp.raw"
    _run(["qemu-img", "convert", "-f", "vvfat", "-O", "raw", f"fat:16:{tree}", str(image)])
    return image


def test_uefi_boots_the_debian_guest_from_sata_disks(
    debian_guest,  # type: ignore[no-untyped-def]
    short_tmp: Path,
) -> None:
    initrd = build_sata_initrd(debian_guest, guest_cache() / "debs", short_tmp / "initrd")
    esp = make_esp({LOADER: debian_guest.vmlinuz, INITRD: initrd}, short_tmp)
    root = short_tmp / "root.qcow2"
    # A throw-away overlay on the shared image (QEMU gets the base as a descriptor too).
    base = str(debian_guest.disk)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(root)])
    options = f"{debian_guest.cmdline} initrd=\\{INITRD}"
    plan = uefi_plan_with_boot_entry(short_tmp / "template.fd", f"\\{LOADER} {options}")
    vars_path = prepare_vars(plan, short_tmp)
    cfg = validate_machine("x86_64", "q35", "uefi", has_kernel=False, has_disk=True)
    with FileHolder() as files:
        esp_file = open_own(esp, files, writable=True)
        root_file = open_own(root, files, writable=True)
        base_file = open_own(debian_guest.disk, files, writable=False)
        spec = VMSpec(
            name="sata-boot",
            vcpus=1,
            memory_mb=1024,
            kernel=None,
            initramfs=None,
            cmdline="",
            accelerator="tcg",
            control_socket=short_tmp / "qmp.sock",
            disk=DiskSpec(esp_file, "raw", bus="sata"),
            extra_disks=(DiskSpec(root_file, "qcow2", ((base_file, "qcow2"),), bus="sata"),),
            machine=cfg,
            firmware=plan,
            firmware_code=open_own(plan.code, files, writable=False, follow_symlinks=True),
            firmware_vars=open_own(vars_path, files, writable=True),
        )
        argv = qemu_argv(QEMU, spec)
        # Nothing but the firmware and the two SATA disks to boot from.
        assert "-kernel" not in argv and "-drive" not in argv
        devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
        disks = [d for d in devices if "drive=" in d]
        assert disks == [
            "ide-hd,bus=sata0.0,drive=disk0,bootindex=1,write-cache=on",
            "ide-hd,bus=sata0.1,drive=disk1,write-cache=on",
        ], devices
        with run_qemu(argv, inherited_fds(spec)) as (_, console):
            loaded = console.wait_for('BdsDxe: starting Boot0000 "file linux.efi"', BOOT_TIMEOUT)
            login = console.wait_for(" login:", 600)
            output = console.text()
    print(f"\nUEFI from SATA disks (TCG): loader started {loaded:.1f} s, login {login:.1f} s")
    # The kernel's AHCI driver (from the initrd) finds both disks on our controller, and the
    # root (LABEL=root, on the second) is mounted from one of them. The sdX names follow
    # probe order, which varies, so any ATA disk name counts: there is no other disk.
    assert len(re.findall(r"ata\d+\.00: ATA-7: QEMU HARDDISK", output)) == 2, output
    assert re.search(r"EXT4-fs \(sd[a-z]\): mounted filesystem", output), output
    assert "Kernel panic" not in output

"""`os { variant }` and the options it stands for: the platform and devices one guest gets.

A Windows variant is one switch for what Windows guests need (q35, UEFI Secure Boot, a TPM 2.0,
Hyper-V enlightenments, the RTC in local time, SATA disks, an e1000e NIC, the seed as a CD-ROM
they can read without virtio drivers, a VGA display). Each piece is also a task option of its
own, and what the task sets itself always wins over the variant. Firmware also has the
plugin's say: its `default_firmware` for tasks that choose none, and `allow_task_firmware =
false` to refuse any other (seed 004: every VM in UEFI Secure Boot).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from nomad_vm.errors import ConfigError

WINDOWS = "windows"
# osinfo's short ids of the Windows releases Windows 11's requirements (TPM 2.0, Secure Boot)
# or Hyper-V enlightenments matter for, and the family name itself.
WINDOWS_VARIANTS = (WINDOWS, "win10", "win11", "win2k16", "win2k19", "win2k22", "win2k25")
VARIANT_FIELD = "config.os.variant"
# osinfo short ids of Linux distributions (libosinfo's naming: family, then version).
LINUX_VARIANT = re.compile(
    r"(?:ubuntu|debian|fedora|centos|centos-stream|rhel|rocky|almalinux|opensuse|sles|sled"
    r"|alpinelinux|archlinux|oraclelinux|amazonlinux|gentoo|nixos|fedora-coreos|flatcar"
    r"|cirros|linux|generic)[0-9][0-9.]*(?:-[a-z0-9.]+)?|(?:archlinux|gentoo|linux|generic)"
)
UEFI_SECURE = "uefi-secure"


@dataclass(frozen=True)
class GuestProfile:
    """What one task's guest gets, every choice made (task option, else variant, else
    default)."""

    variant: str = ""
    # The task's own `os.machine` ("" unset), and the machine its firmware or variant wants
    # when it names none ("" none: the hypervisor's own default). Only used where the
    # hypervisor has it, so a Cloud Hypervisor task is told about the firmware, not q35.
    machine: str = ""
    default_machine: str = ""
    firmware: str = "bios"
    tpm: bool = False
    hyperv: bool = False
    rtc_localtime: bool = False
    nic_model: str = "virtio"
    disk_bus: str = "virtio"  # for disks that name no bus_type
    seed_cdrom: bool = False
    # The graphical console's adapter (`display`): a Windows guest has no serial console to
    # speak of, so its variant gives it a standard VGA unless the task says otherwise.
    display: str = "none"

    @property
    def windows(self) -> bool:
        return self.variant in WINDOWS_VARIANTS

    def machine_on(self, machine_types: tuple[str, ...]) -> str:
        """The machine on a hypervisor offering ``machine_types`` (its default first)."""
        if self.machine:
            return self.machine
        if self.default_machine in machine_types:
            return self.default_machine
        return machine_types[0]


def parse_variant(value: object) -> str:
    """The variant ("" when unset); an unknown one is refused naming `os.variant`.

    A Linux distribution's osinfo id (the ch seed's `variant = "ubuntu20.04"`) is accepted
    and changes nothing: a Linux cloud guest needs no platform switch, and a job copied from
    nomad-driver-ch should not have to drop the line."""
    variant = str(value or "")
    if variant and variant not in WINDOWS_VARIANTS and not LINUX_VARIANT.fullmatch(variant):
        raise ConfigError(
            VARIANT_FIELD,
            f"unknown variant {variant!r}: nomad-vm knows the Windows family "
            f"({', '.join(WINDOWS_VARIANTS)}) and Linux distributions' osinfo ids (e.g. "
            '"ubuntu22.04", "debian12", "rhel9.4", which change nothing)',
        )
    return variant


def guest_profile(
    values: Mapping[str, object],
    os_block: Mapping[str, object],
    nic_block: Mapping[str, object],
    default_firmware: str,
    allow_task_firmware: bool,
) -> GuestProfile:
    """The task's choices (``values``: its validated config) over its variant's over the
    plugin's defaults."""
    variant = parse_variant(os_block.get("variant"))
    windows = variant in WINDOWS_VARIANTS

    def chosen(name: str, by_variant: object, default: object) -> object:
        given = values.get(name)
        if given is not None:
            return given
        return by_variant if windows else default

    firmware = _firmware(values.get("firmware"), windows, default_firmware)
    if not allow_task_firmware and firmware != default_firmware:
        field = "config.firmware" if values.get("firmware") else VARIANT_FIELD
        raise ConfigError(
            field,
            f"this node runs every VM with firmware {default_firmware!r} (the plugin's "
            f"default_firmware = {default_firmware!r} and allow_task_firmware = false), and "
            f"this task asks for {firmware!r}; remove the task's choice or ask the operator",
        )
    machine = str(os_block.get("machine") or "")
    if firmware == UEFI_SECURE and machine in ("pc", "microvm") and not values.get("firmware"):
        # The task did not choose Secure Boot: say where it comes from.
        source = f"its os.variant {variant!r}" if windows else "the plugin's default_firmware"
        raise ConfigError(
            "config.os.machine",
            f"{machine!r} cannot run uefi-secure, which this task gets from {source}: Secure "
            'Boot needs q35 (leave os.machine unset or set "q35"), or set firmware'
            + ("" if allow_task_firmware else " (refused here: allow_task_firmware = false)"),
        )
    model = nic_block.get("model")
    return GuestProfile(
        variant=variant,
        machine=machine,
        # Secure Boot needs SMM-protected firmware, which QEMU gives on q35 only.
        default_machine="q35" if windows or firmware == UEFI_SECURE else "",
        firmware=firmware,
        tpm=bool(chosen("tpm", True, False)),
        hyperv=bool(chosen("hyperv", True, False)),
        rtc_localtime=chosen("rtc", "localtime", "utc") == "localtime",
        nic_model=str(model) if model else ("e1000e" if windows else "virtio"),
        disk_bus="sata" if windows else "virtio",
        seed_cdrom=windows,
        display=str(chosen("display", "vga", "none")),
    )


def _firmware(given: object, windows: bool, default: str) -> str:
    if given:
        return str(given)
    return UEFI_SECURE if windows else default

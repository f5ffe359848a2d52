"""How the guest sees a disk, checked: its bus (on the task's machine type), its kind (disk
or cdrom), read-only, its serial number (`devname`) and its cache mode (`driver`). Shared by
the `disk {}` blocks of ``storage.disk_request`` and ``storage.volume_request``, and by
``driver.volume_disks`` (a read-only volume mount); the devices themselves are
``vm.qemu.disk_devices``. Errors name the field they are given.
"""

from __future__ import annotations

import re

from nomad_vm.errors import ConfigError

BUSES = ("virtio", "sata", "scsi", "ide")
KINDS = ("disk", "cdrom")
# QEMU cache modes whose file node opens its descriptor without O_DIRECT. The disk reaches an
# unprivileged QEMU as a descriptor the plugin opened (``-add-fd``), and QEMU cannot add
# O_DIRECT to a descriptor it is handed, so `none` and `directsync` (and io=native, which
# needs them) cannot be honoured and are refused rather than silently downgraded.
CACHE_MODES = ("writeback", "writethrough", "unsafe")
# virtio-blk's serial holds 20 bytes (VIRTIO_BLK_ID_BYTES); the same limit suits ATA and SCSI.
SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,19}")


def serial_of(field: str, serial: str) -> str:
    if serial and not SERIAL.fullmatch(serial):
        raise ConfigError(
            field,
            f"{serial!r}: the guest sees devname as the disk's serial number, 1 to 20 letters, "
            "digits, '.', '_' or '-' (starting with a letter or digit)",
        )
    return serial


def check_bus(field: str, bus: str, kind: str, machine: str) -> None:
    """The bus exists on the machine type and can carry this kind of disk."""
    if bus not in BUSES:
        raise ConfigError(field, f"must be one of {', '.join(BUSES)}; got {bus!r}")
    if kind == "cdrom" and bus == "virtio":
        raise ConfigError(field, "virtio has no CD-ROM device: use sata, scsi or ide for a cdrom")
    if bus == "ide" and machine != "pc":
        raise ConfigError(
            field,
            f"the {machine} machine has no IDE bus (only pc does): use sata, scsi or virtio, "
            'or os { machine = "pc" }',
        )
    if bus == "sata" and machine == "microvm":
        raise ConfigError(field, "microvm has no PCI bus for a SATA controller: use virtio")


def check_read_only(field: str, bus: str, kind: str, why: str = "") -> None:
    """QEMU's IDE disk (ide-hd, also on AHCI) has no write protection and refuses a read-only
    drive at start ("Block node is read-only"): say so before anything runs."""
    if kind == "disk" and bus in ("sata", "ide"):
        raise ConfigError(
            field,
            f"{why}a {bus} hard disk cannot be read-only in QEMU (its IDE disk has no write "
            'protection): use bus_type = "scsi" or "virtio", or kind = "cdrom"',
        )


def cache_mode(field: str, value: str) -> str:
    """`driver`: a cache mode (`writeback`, the default; `writethrough`; `unsafe`), also
    written `cache=<mode>`."""
    mode = value.removeprefix("cache=") if value else "writeback"
    if mode in ("none", "directsync") or "io=" in mode:
        raise ConfigError(
            field,
            f"{value!r} needs O_DIRECT, which QEMU cannot add to the descriptor nomad-vm hands "
            f"it; use one of {', '.join(CACHE_MODES)}",
        )
    if mode not in CACHE_MODES:
        raise ConfigError(
            field, f"unknown cache mode {value!r}; use one of {', '.join(CACHE_MODES)}"
        )
    return mode

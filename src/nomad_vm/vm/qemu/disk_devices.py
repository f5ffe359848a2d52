"""The task's disks as QEMU devices: the primary (``VMSpec.disk``, node ``disk0``, boot index
1) then the others (``disk1``, ...), each on the bus its `disk` block asked for.

* virtio: ``virtio-blk`` (``-device`` on microvm, which has no PCI).
* sata: ``ide-hd``/``ide-cd`` on ports of one AHCI controller of ours (``sata0``, 6 ports).
* scsi: ``scsi-hd``/``scsi-cd`` on one virtio-scsi controller of ours (``scsi0``).
* ide: ``ide-hd``/``ide-cd`` on the IDE controller built into pc (``ide.0``/``ide.1``, two
  units each); q35 and microvm have none (``storage.disk_device`` refuses it first).

``serial`` gives the guest a stable name: Linux lists a virtio disk as
``/dev/disk/by-id/virtio-<serial>`` and shows it in ``/sys/block/vdX/serial``.

The cache mode: a device's ``write-cache`` says whether the guest sees a volatile write cache
(it then flushes when it must); ``writethrough`` turns it off, so every write is flushed
before it completes; ``unsafe`` drops the guest's flushes (``cache.no-flush``).
"""

from __future__ import annotations

from nomad_vm.vm.qemu.files_argv import SEED_NODE, FdSets, disk_argv
from nomad_vm.vm.spec import DiskSpec, VMSpec

AHCI = "sata0"
AHCI_PORTS = 6
VIRTIO_SCSI = "scsi0"
IDE_UNITS = 4


def disks_argv(sets: FdSets, spec: VMSpec) -> list[str]:
    disks = ([spec.disk] if spec.disk is not None else []) + list(spec.extra_disks)
    virtio = "device" if spec.machine.machine == "microvm" else "pci"
    buses = {disk.bus for disk in disks}
    if spec.seed is not None:
        buses.add(spec.seed_bus)
    argv: list[str] = []
    if "sata" in buses:
        argv += ["-device", f"ahci,id={AHCI}"]
    if "scsi" in buses:
        argv += ["-device", f"virtio-scsi-{virtio},id={VIRTIO_SCSI}"]
    used = {"sata": 0, "ide": 0}
    for i, disk in enumerate(disks):
        node = f"disk{i}"
        cache = {"cache": {"no-flush": True}} if disk.cache == "unsafe" else {}
        argv += disk_argv(sets, disk, node, **cache)
        device = _device(disk, node, virtio, used)
        if i == 0 and spec.disk is not None:
            device += ",bootindex=1"
        if disk.kind == "disk":
            device += f",write-cache={'off' if disk.cache == 'writethrough' else 'on'}"
        if disk.serial:
            device += f",serial={disk.serial}"
        argv += ["-device", device]
    return argv


def seed_device(spec: VMSpec, virtio: str) -> str:
    """The seed ISO's device: a virtio disk, or a CD-ROM on the AHCI port after the disks'."""
    if spec.seed_bus == "virtio":
        return f"virtio-blk-{virtio},drive={SEED_NODE}"
    disks = ([spec.disk] if spec.disk is not None else []) + list(spec.extra_disks)
    port = sum(1 for disk in disks if disk.bus == "sata")
    if port >= AHCI_PORTS:
        raise ValueError(f"no free sata port for the seed after {port} disks")  # refused first
    return f"ide-cd,bus={AHCI}.{port},drive={SEED_NODE}"


def _device(disk: DiskSpec, node: str, virtio: str, used: dict[str, int]) -> str:
    cdrom = disk.kind == "cdrom"
    if disk.bus == "virtio":
        return f"virtio-blk-{virtio},drive={node}"
    if disk.bus == "scsi":
        return f"{'scsi-cd' if cdrom else 'scsi-hd'},bus={VIRTIO_SCSI}.0,drive={node}"
    model = "ide-cd" if cdrom else "ide-hd"
    n = used[disk.bus]
    used[disk.bus] += 1
    if disk.bus == "sata":
        if n >= AHCI_PORTS:
            raise ValueError(f"more than {AHCI_PORTS} sata disks")  # refused when parsed
        return f"{model},bus={AHCI}.{n},drive={node}"
    if n >= IDE_UNITS:
        raise ValueError(f"more than {IDE_UNITS} ide disks")  # refused when parsed
    return f"{model},bus=ide.{n // 2},unit={n % 2},drive={node}"

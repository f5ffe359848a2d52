"""`disk {}` blocks on every bus, seen from inside a real Linux guest: the Debian test guest
(which has the AHCI, IDE, virtio-scsi, SCSI disk and CD-ROM drivers the tiny guest lacks) boots
through the real plugin with extra disks on sata, scsi, ide and virtio. One guest for all.

For each disk the guest must show: a /dev/disk/by-id link carrying its `devname` (the serial
QEMU gives the device: stable whatever order the kernel names sdX/srN in), the bus's own kind
of link (ata- for sata and ide, scsi- for scsi, virtio- for virtio); a read-only disk that
refuses writes; a `kind = "cdrom"` that is a CD-ROM (an sr device of SCSI type 5, read-only)
with the source's bytes; writable disks that take writes.
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, configure, drv, task_config
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until

MARK_RO, MARK_CD = b"NVMRO!!!", b"NVMCD!!!"
# devname -> (bus link prefix, read-only, cdrom, first bytes or None)
EXPECTED = {
    "sata-rw": ("ata-", False, False, None),
    "scsi-rw": ("scsi-", False, False, None),
    "ide-rw": ("ata-", False, False, None),
    "scsi-ro": ("scsi-", True, False, MARK_RO),
    "virtio-ro": ("virtio-", True, False, MARK_RO),
    "sata-cd": ("ata-", True, True, MARK_CD),
    "scsi-cd": ("scsi-", True, True, MARK_CD),
    "ide-cd": ("ata-", True, True, MARK_CD),
}
# Prints "<devname> <by-id link> <kernel name> ro=<0|1> type=<SCSI type> head=<8 bytes>
# write=<ok|refused>" per disk, found by the serial at the end of its by-id link.
PROBE = r"""
udevadm settle
cd /dev/disk/by-id
for s in %s; do
  l=$(ls | grep -E "[-_]$s\$" | head -1)
  [ -n "$l" ] || { echo "$s missing: $(ls | tr '\n' ' ')"; continue; }
  d=$(readlink -f "$l"); b=$(basename "$d")
  t=$(cat /sys/block/$b/device/type 2>/dev/null || echo none)
  h=$(head -c 8 "$d" | tr -c 'A-Za-z!' '.')
  if dd if=/dev/zero of="$d" bs=512 count=1 oflag=direct conv=fsync 2>/dev/null; then
    w=ok; else w=refused; fi
  echo "$s $l $b ro=$(blockdev --getro "$d") type=$t head=$h write=$w"
done
"""


def _run(plugin: PluginProcess, task_id: str, script: str) -> tuple[str, int]:
    reply = drv(plugin).ExecTask(
        driver_pb2.ExecTaskRequest(task_id=task_id, command=["/bin/sh", "-c", script]),
        timeout=120,
    )
    return (reply.stdout + reply.stderr).decode(errors="replace"), reply.result.exit_code


def test_each_bus_devname_read_only_and_cdrom_inside_a_linux_guest(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    (images / "ro.raw").write_bytes(MARK_RO + bytes(1024 * 1024 - 8))
    (images / "cd.raw").write_bytes(MARK_CD + bytes(2 * 1024 * 1024 - 8))
    ro = {"image": str(images / "ro.raw"), "format": "raw"}
    cd = {"image": str(images / "cd.raw"), "format": "raw"}
    disks = [
        {"primary": True, "chained": True, "source": {"image": str(debian_guest.disk)}},
        {"bus_type": "sata", "size": "16MiB", "devname": "sata-rw"},
        {"bus_type": "scsi", "size": "16MiB", "devname": "scsi-rw"},
        {"bus_type": "ide", "size": "16MiB", "devname": "ide-rw"},
        {"bus_type": "scsi", "read_only": True, "devname": "scsi-ro", "source": ro},
        {"read_only": True, "devname": "virtio-ro", "source": ro},
        {"kind": "cdrom", "bus_type": "sata", "devname": "sata-cd", "source": cd},
        {"kind": "cdrom", "bus_type": "scsi", "devname": "scsi-cd", "source": cd},
        {"kind": "cdrom", "bus_type": "ide", "devname": "ide-cd", "source": cd},
    ]
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent), str(images)])
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        "disk": disks,
        # The guest's own kernel with its root on the primary disk: faster than its boot
        # loader under TCG.
        "kernel": str(debian_guest.vmlinux),
        "initramfs": str(debian_guest.initrd),
        "cmdline": debian_guest.cmdline,
    }
    cfg = task_config(alloc, config, task_id="alloc/tiny/buses1")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 300), events
        out, code = _run(plugin, cfg.id, PROBE % " ".join(EXPECTED))
        stop(plugin, cfg.id, 30)
        wait(plugin, cfg.id, timeout=60)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    assert code == 0, out
    seen = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    for devname, (prefix, read_only, cdrom, head) in EXPECTED.items():
        assert devname in seen and "missing:" not in seen[devname], (devname, out)
        link, kernel_name, ro, scsi_type, first, write = seen[devname]
        assert link.startswith(prefix), (devname, link)
        assert ro == f"ro={int(read_only)}", (devname, out)
        assert write == ("write=refused" if read_only else "write=ok"), (devname, out)
        if cdrom:
            assert kernel_name.startswith("sr") and scsi_type == "type=5", (devname, out)
        else:
            assert not kernel_name.startswith("sr"), (devname, out)
        if head is not None:
            assert first == f"head={head.decode()}", (devname, out)
    # The source images stayed as they were; the task's disk files went with it.
    assert (images / "ro.raw").read_bytes().startswith(MARK_RO)
    assert not [p for p in alloc.rglob("disk*.*") if p.is_file()]

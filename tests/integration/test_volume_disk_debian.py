"""`disk { volume }` inside a real Linux guest: the Debian test guest, through the real plugin,
gets a directory volume's disk as a second disk (found by its devname under
/dev/disk/by-id), makes a file system on it and writes a file; the next task, with the
volume_mount read-only (and named as Nomad 2.0.1+ names it), mounts that file system
read-only, reads the file, and cannot write the disk."""

from __future__ import annotations

from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, configure, drv, task_config
from tests.integration.test_disk_buses_debian import _run
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until
from tests.integration.test_volume_disks import mount

DISK = "/dev/disk/by-id/virtio-voldata"
WRITE = f"""set -e
udevadm settle
mkfs.ext4 -q {DISK}
mkdir -p /mnt/v && mount {DISK} /mnt/v
echo written-by-the-first-task > /mnt/v/marker
umount /mnt/v && sync
echo done
"""
READ = f"""udevadm settle
mkdir -p /mnt/v && mount -o ro {DISK} /mnt/v && cat /mnt/v/marker
echo ro=$(blockdev --getro {DISK})
dd if=/dev/zero of={DISK} bs=512 count=1 oflag=direct conv=fsync 2>/dev/null || echo write-refused
"""


def _task(
    plugin: PluginProcess,
    root: Path,
    guest,  # type: ignore[no-untyped-def]
    name: str,
    volume_mount: driver_pb2.Mount,
    script: str,
) -> tuple[str, int]:
    """Boot the Debian guest with the volume's disk, run ``script`` through its agent."""
    disks = [
        {"primary": True, "chained": True, "source": {"image": str(guest.disk)}},
        {"volume": "data", "size": "64MiB", "devname": "voldata"},
    ]
    stream, events = collect_events(plugin)
    alloc = root / name
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        "disk": disks,
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initrd),
        "cmdline": guest.cmdline,
    }
    cfg = task_config(alloc, config, task_id=f"alloc/tiny/{name}")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    cfg.mounts.append(volume_mount)
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 300), events
        out = _run(plugin, cfg.id, script)
        stop(plugin, cfg.id, 30)
        wait(plugin, cfg.id, timeout=60)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    return out


def test_a_file_system_on_a_volume_disk_outlives_the_task(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    volume = short_tmp / "vol"
    volume.mkdir()
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)])
    out, code = _task(
        plugin, short_tmp, debian_guest, "deb1", mount(volume, "/volumes/data"), WRITE
    )
    assert code == 0 and "done" in out, out
    ro = mount(volume, "/srv/anything", readonly=True, name="data")
    out, code = _task(plugin, short_tmp, debian_guest, "deb2", ro, READ)
    assert "written-by-the-first-task" in out, out
    assert "ro=1" in out and "write-refused" in out, out
    assert sorted(p.name for p in volume.iterdir()) == ["nomad-vm-disk.qcow2"]

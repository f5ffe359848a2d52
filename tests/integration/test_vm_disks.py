"""`disk {}` blocks and directory storage pools with real qemu-img and QEMU (the tiny guest,
through the real plugin process): what the guest sees of each disk, what stays in a pool."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import (
    RUNNING,
    _run_to_completion,
    destroy,
    stop,
    wait,
)


def test_disk_blocks_each_reach_the_guest_with_size_serial_and_bus(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Several `disk` blocks: an overlay on an image (grown), an empty raw disk, a read-only
    copy, and disks and cdroms on the sata, scsi and (pc) ide buses. The guest sees each
    virtio disk with its size and serial, cannot write the read-only one, and has the AHCI
    and virtio-scsi controllers (the tiny guest has no driver for their disks: QEMU
    accepting them is the check); the image stays untouched."""
    import hashlib

    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMDISK!" + bytes(32 * 1024 * 1024 - 8))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    disks = [
        {"size": "20MB", "devname": "scratch", "format": "raw"},
        {
            "primary": True,
            "size": "64MiB",
            "chained": True,
            "devname": "root",
            "source": {"image": str(base), "format": "raw"},
        },
        {"read_only": True, "devname": "ro-data", "source": {"image": str(base)}},
        {"size": "16MiB", "bus_type": "sata", "driver": "writethrough"},
        {"size": "8388608", "bus_type": "scsi", "driver": "unsafe", "sparse": False},
        {"size": "4MiB", "bus_type": "ide"},
        {"kind": "cdrom", "bus_type": "ide", "source": {"image": str(base)}},
        {"kind": "cdrom", "bus_type": "scsi", "chained": True, "source": {"image": str(base)}},
    ]
    run = (
        "for d in /sys/block/vd*; do echo disk $(basename $d) $(cat $d/size) $(cat $d/serial);"
        " done; head -c 8 /dev/vda; echo; "
        "echo x | dd of=/dev/vdc conv=fsync 2>/dev/null || echo ro-refused; "
        "echo pci $(cat /sys/bus/pci/devices/*/device | tr '\\n' ' ')"
    )
    result, console = _run_to_completion(
        plugin,
        short_tmp,
        tiny_guest,
        "disks",
        run,
        overrides={"disk": disks, "cloud_init": False},
        image_paths=[str(tiny_guest.vmlinux.parent), str(images)],
    )
    text = console.decode(errors="replace")
    assert result.result.exit_code == 0, (result, text[-2000:])
    # The primary first (64 MiB), then the blocks' order: 20 MB rounded up to 20 MiB, the
    # read-only copy at the image's 32 MiB. Sizes in 512-byte sectors.
    assert "disk vda 131072 root" in text, text[-2000:]
    assert "disk vdb 40960 scratch" in text, text[-2000:]
    assert "disk vdc 65536 ro-data" in text, text[-2000:]
    assert "disk vdd" not in text  # sata and scsi disks are not virtio-blk
    assert "NVMDISK!" in text and "ro-refused" in text
    pci = next(line for line in text.splitlines() if line.startswith("pci "))
    assert "0x2922" in pci  # ICH9 AHCI
    assert "0x1004" in pci or "0x1048" in pci  # virtio-scsi (legacy or modern id)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    # Every disk file the start made was removed with the task.
    assert not [p for p in short_tmp.rglob("disk*.*") if p.is_file()]


def test_directory_pool_volumes_outlive_their_tasks(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A named volume in a directory pool keeps what one task's guest wrote for the next; a
    chained clone of it leaves it untouched; a source image written into the pool is made
    once and reused by the next task with the same source."""
    pool = short_tmp / "pool"
    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMBASE!" + bytes(16 * 1024 * 1024 - 8))
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]

    def run(name: str, disks: list[dict[str, object]], command: str) -> str:
        result, console = _run_to_completion(
            plugin,
            short_tmp,
            tiny_guest,
            name,
            command,
            overrides={"disk": disks},
            image_paths=paths,
            plugin_options=options,
        )
        text = console.decode(errors="replace")
        assert result.result.exit_code == 0, (result, text[-2000:])
        return text

    data = [{"pool": "local", "name": "data", "size": "8MiB", "format": "raw"}]
    write = "echo persisted-marker | dd of=/dev/vda conv=fsync 2>/dev/null && echo wrote"
    assert "wrote" in run("pool1", data, write)
    assert (pool / "data").read_bytes().startswith(b"persisted-marker")
    assert "persisted-marker" in run("pool2", data, "head -c 16 /dev/vda; echo")

    # A chained clone (the default pool): sees the volume, writes only to its overlay.
    clone = [{"chained": True, "source": {"volume": "data", "format": "raw"}}]
    text = run(
        "pool3",
        clone,
        "head -c 16 /dev/vda; echo; echo overwritten | dd of=/dev/vda conv=fsync 2>/dev/null",
    )
    assert "persisted-marker" in text
    assert (pool / "data").read_bytes().startswith(b"persisted-marker")

    # No `pool`: the default pool (the only one), as in nomad-driver-virt.
    from_image = [{"chained": True, "source": {"image": str(base)}}]
    inodes = set()
    for name in ("pool4", "pool5"):
        assert "NVMBASE!" in run(name, from_image, "head -c 8 /dev/vda; echo")
        imported = [p for p in pool.iterdir() if p.name.startswith("base-")]
        assert len(imported) == 1, sorted(pool.iterdir())
        inodes.add(imported[0].stat().st_ino)
    assert len(inodes) == 1  # the second task reused the first one's volume
    # Only the volumes: no in-progress file, no task disk left in the pool.
    assert sorted(p.name for p in pool.iterdir()) == sorted(["data", imported[0].name])
    assert oct(pool.stat().st_mode & 0o777) == "0o700"
    assert not [p for p in short_tmp.rglob("disk*.*") if p.is_file()]


def test_a_disk_cannot_leave_its_pool(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A volume name is one component of the pool, and a symlink in the pool leads nowhere."""
    pool = short_tmp / "pool"
    pool.mkdir(mode=0o700)
    outside = short_tmp / "secret.raw"
    outside.write_bytes(b"SECRET!!" + bytes(1024 * 1024))
    (pool / "link").symlink_to(outside)
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    for name, disk, field in (
        ("esc1", {"name": "../secret.raw", "size": "1MiB"}, "config.disk[0].name"),
        ("esc2", {"source": {"volume": "link"}}, "config.disk[0].source.volume"),
        ("esc3", {"name": "link"}, "config.disk[0].name"),
    ):
        with tiny_task(
            plugin,
            short_tmp,
            tiny_guest,
            alloc_name=name,
            overrides={"disk": [disk]},
            plugin_options=options,
        ) as (cfg, _, _):
            with pytest.raises(grpc.RpcError) as err:
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert field in str(err.value.details()), err.value.details()
            destroy(plugin, cfg.id)
    assert sorted(p.name for p in pool.iterdir()) == ["link"]
    assert outside.read_bytes().startswith(b"SECRET!!")


def test_a_pool_volume_in_use_is_refused_to_a_second_task(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Two running VMs writing one volume would corrupt it: QEMU's image lock (on the
    descriptor the plugin handed it) refuses the second, and the first runs on."""
    pool = short_tmp / "pool"
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    disks = [{"pool": "local", "name": "shared", "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="lock1", overrides={"disk": disks},
        plugin_options=options,
    ) as (first, fifo, _):  # fmt: skip
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=first), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="lock2", overrides={"disk": disks},
            plugin_options=options,
        ) as (second, _, _):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=second), timeout=60)
            assert "lock" in str(err.value.details()), err.value.details()
            destroy(plugin, second.id)
        stop(plugin, first.id, 5)
        wait(plugin, first.id)
        destroy(plugin, first.id)
    assert sorted(p.name for p in pool.iterdir()) == ["shared"]


def test_a_raw_pool_volume_is_never_probed(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A guest can write a qcow2 header naming another file into its raw volume; the next
    task gets the volume as raw (the format its block says), header bytes and all."""
    import subprocess

    from nomad_vm.storage.tools import find_qemu_img

    pool = short_tmp / "pool"
    pool.mkdir(mode=0o700)
    secret = short_tmp / "secret.raw"
    secret.write_bytes(b"SECRET!!" + bytes(1024 * 1024))
    header = short_tmp / "header.qcow2"
    qemu_img = str(find_qemu_img())
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw",
         str(header), "1M"],
        check=True,
    )  # fmt: skip
    (pool / "evil").write_bytes(header.read_bytes().ljust(4 * 1024 * 1024, b"\0"))
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    result, console = _run_to_completion(
        plugin,
        short_tmp,
        tiny_guest,
        "probe",
        "head -c 3 /dev/vda; echo; echo size=$(cat /sys/block/vda/size)",
        overrides={"disk": [{"pool": "local", "name": "evil", "format": "raw"}]},
        plugin_options=options,
    )
    text = console.decode(errors="replace")
    assert result.result.exit_code == 0, (result, text[-2000:])
    assert "QFI" in text and "size=8192" in text and "SECRET" not in text, text[-2000:]

"""`disk { volume = "<name>" }`: which of the task's mounts backs the disk (by the name Nomad
2.0.1+ sends, else by the destination's last component), what is refused with it, and that
the matched mount is not also shared as a directory. The disks themselves:
tests/integration/test_volume_disks.py (real QEMU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.driver.shares import task_shares
from nomad_vm.driver.types import TaskMount
from nomad_vm.errors import ConfigError
from nomad_vm.identity import ALIASES
from nomad_vm.storage.volume_disk import disk_file_name
from tests.unit.tasks import unit_task


def parse(tmp_path: Path, disks: list[dict[str, object]], mounts: tuple[TaskMount, ...]):  # type: ignore[no-untyped-def]
    (tmp_path / "alloc").mkdir(exist_ok=True)
    plugin = parse_plugin_config({"image_paths": []}, ALIASES["virt"])
    task = replace(unit_task(tmp_path / "alloc", {"disk": disks}), mounts=mounts)
    return task, parse_task_config(task, plugin)


OLD = (  # what Nomad before 2.0.1 sends: no volume names
    TaskMount("/srv/www", "/host/www", False),
    TaskMount("/volumes/data", "/host/data", False),
)
NEW = (  # Nomad 2.0.1+: the group volume's name on each mount
    TaskMount("/volumes/data", "/host/other", False, "other"),
    TaskMount("/mnt/anything", "/host/data", True, "data"),
)


def test_before_nomad_2_0_1_the_destination_names_the_volume(tmp_path: Path) -> None:
    task, vm = parse(tmp_path, [{"volume": "data", "size": "1GiB"}], OLD)
    (disk,) = vm.disks
    assert (disk.nomad_volume, disk.volume_mount) == ("data", 1)
    assert disk.volume_host == Path("/host/data")
    assert not disk.read_only and disk.persistent and disk.format == "qcow2"
    assert disk.source_format == ""  # not stated: detected for a file, qcow2 in a directory
    # The disk's mount is not also a shared directory; the others still are.
    shares = task_shares(task, vm)
    assert [s.guest_path for s in shares if s.tag.startswith("nomad-vol")] == ["/srv/www"]


def test_a_request_name_decides_when_nomad_sends_one(tmp_path: Path) -> None:
    """The first mount's destination ends in "data" but it is another volume's: by name, the
    second is the disk's; it is read-only, so the disk is."""
    task, vm = parse(tmp_path, [{"volume": "data", "format": "raw"}], NEW)
    (disk,) = vm.disks
    assert (disk.volume_mount, disk.volume_host, disk.read_only) == (1, Path("/host/data"), True)
    assert disk.format == disk.source_format == "raw"
    assert [s.guest_path for s in task_shares(task, vm) if s.tag.startswith("nomad-vol")] == [
        "/volumes/data"
    ]


@pytest.mark.parametrize(
    ("disks", "mounts", "field", "says"),
    [
        ([{"volume": "db"}], OLD, "config.disk[0].volume", 'destination = "/volumes/db"'),
        ([{"volume": "db"}], OLD, "config.disk[0].volume", "before 2.0.1"),
        ([{"volume": "db"}], NEW, "config.disk[0].volume", "mounts the group volume 'db'"),
        (
            [{"volume": "data"}],
            (*OLD, TaskMount("/other/data", "/host/x", False)),
            "config.disk[0].volume",
            "several volume_mounts",
        ),
        (
            [{"volume": "data"}, {"volume": "data"}],
            OLD,
            "config.disk[1].volume",
            "already backed",
        ),
        ([{"volume": "a/b"}], OLD, "config.disk[0].volume", "no '/'"),
        ([{"volume": "data", "pool": "x"}], OLD, "config.disk[0].pool", "volume's data"),
        ([{"volume": "data", "name": "x"}], OLD, "config.disk[0].name", "volume's data"),
        ([{"volume": "data", "chained": True}], OLD, "config.disk[0].chained", "volume's data"),
        (
            [{"volume": "data", "source": {"image": "/x.img"}}],
            OLD,
            "config.disk[0].source.image",
            "volume's data",
        ),
        (
            [{"volume": "data", "format": "raw", "source": {"format": "qcow2"}}],
            OLD,
            "config.disk[0].format",
            "disagree",
        ),
        ([{"volume": "data", "format": "vmdk"}], OLD, "config.disk[0].format", "qcow2 or raw"),
        ([{"volume": "data", "size": "huge"}], OLD, "config.disk[0].size", "not a size"),
        (
            [{"volume": "data", "read_only": True, "bus_type": "sata"}],
            OLD,
            "config.disk[0].read_only",
            "cannot be read-only",
        ),
        # A read-only mount makes the disk read-only: a sata hard disk cannot be.
        ([{"volume": "data", "bus_type": "sata"}], NEW, "config.disk[0].bus_type", "read-only"),
    ],
)
def test_bad_volume_disks_name_the_field(
    tmp_path: Path,
    disks: list[dict[str, object]],
    mounts: tuple[TaskMount, ...],
    field: str,
    says: str,
) -> None:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, disks, mounts)
    assert err.value.field == field, err.value
    assert says in str(err.value), err.value


def test_the_disk_file_of_a_directory_volume_is_named_by_its_format() -> None:
    assert disk_file_name("qcow2") == "nomad-vm-disk.qcow2"
    assert disk_file_name("raw") == "nomad-vm-disk.raw"


def test_nomad_s_mounts_keep_the_volume_name() -> None:
    """Nomad 2.0.1+ sends `request_name`; earlier ones leave it empty."""
    from nomad_vm.plugin.convert import task_config
    from nomad_vm.plugin.proto import driver_pb2

    pb = driver_pb2.TaskConfig(
        id="a/t/1",
        mounts=[
            driver_pb2.Mount(task_path="/v/data", host_path="/h/d", readonly=True,
                             request_name="data"),
            driver_pb2.Mount(task_path="/v/www", host_path="/h/w"),
        ],
    )  # fmt: skip
    assert task_config(pb).mounts == (
        TaskMount("/v/data", "/h/d", True, "data"),
        TaskMount("/v/www", "/h/w", False, ""),
    )


def test_a_block_device_reaches_qemu_through_host_device() -> None:
    """QEMU's file driver takes regular files only."""
    from nomad_vm.storage.held import HeldFile
    from nomad_vm.vm.qemu.files_argv import FdSets, disk_argv
    from nomad_vm.vm.spec import DiskSpec

    held = HeldFile(Path("/dev/loop9"), 7, True)
    block = disk_argv(FdSets(), DiskSpec(held, "raw", block_device=True))
    plain = disk_argv(FdSets(), DiskSpec(held, "raw"))
    assert '"file":{"driver":"host_device","filename":"/dev/fdset/1"' in block[-1], block
    assert '"file":{"driver":"file","filename":"/dev/fdset/1"' in plain[-1], plain

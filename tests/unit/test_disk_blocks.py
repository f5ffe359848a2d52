"""`disk {}` blocks (nomad-driver-virt's syntax) as a task's config parses them: sizes, the
primary, buses per machine type, devname, cache modes, and every bad value refused naming
its field. The disks themselves are made by tests/integration (real qemu-img and QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.identity import ALIASES
from nomad_vm.storage.disk_request import MIB, parse_size
from tests.unit.tasks import unit_task


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "base.img").write_bytes(b"\0" * 512)
    (tmp_path / "alloc").mkdir()
    return tmp_path / "images"


VIRT = ALIASES["virt"]


def parse(images: Path, config: dict[str, object]):  # type: ignore[no-untyped-def]
    plugin = parse_plugin_config({"image_paths": [str(images)]}, VIRT)
    return parse_task_config(unit_task(images.parent / "alloc", config), plugin)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("10GiB", 10 * 1024**3),
        ("20GB", 20 * 1000**3 + (-(20 * 1000**3) % MIB)),  # rounded up to a whole MiB
        ("1073741824", 1024**3),
        ("512M", 512 * MIB),
        (" 2 TiB ", 2 * 1024**4),
        ("1", MIB),
    ],
)
def test_sizes_in_the_seeds_units(value: str, size: int) -> None:
    assert parse_size(value, "f") == size


@pytest.mark.parametrize("value", ["10 parsecs", "GiB", "-1GiB", "0", "1.5GiB", "65TiB"])
def test_bad_sizes_name_the_field(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_size(value, "config.disk[0].size")
    assert err.value.field == "config.disk[0].size"


def test_several_disks_primary_first_with_their_options(images: Path) -> None:
    vm = parse(
        images,
        {
            "disk": [
                {"size": "1GiB", "devname": "scratch", "format": "raw", "sparse": False},
                {
                    "primary": True,
                    "chained": True,
                    "size": "2GiB",
                    "source": {"image": str(images / "base.img"), "format": "raw"},
                },
                {"size": "1GiB", "bus_type": "scsi", "driver": "cache=unsafe", "read_only": True},
            ]
        },
    )
    primary, scratch, scsi = vm.disks
    assert primary.primary and primary.image == images / "base.img" and primary.chained
    assert (vm.image, vm.use_thin_copy, vm.disk_size_mb) == (images / "base.img", True, 2048)
    assert (scratch.format, scratch.serial, scratch.sparse, scratch.image) == (
        "raw",
        "scratch",
        False,
        None,
    )
    assert (scsi.bus, scsi.cache, scsi.read_only) == ("scsi", "unsafe", True)
    assert [d.file_name(i) for i, d in enumerate(vm.disks)] == [
        "disk.qcow2",
        "disk1.raw",
        "disk2.qcow2",
    ]


def test_a_raw_primary_is_named_for_its_format(images: Path) -> None:
    vm = parse(images, {"disk": [{"size": "1GiB", "format": "raw"}]})
    assert vm.disks[0].file_name(0) == "disk.raw"


def test_the_first_disk_is_primary_when_none_is_marked(images: Path) -> None:
    vm = parse(
        images,
        {"disk": [{"source": {"image": str(images / "base.img")}}, {"size": "1GiB"}]},
    )
    assert vm.disks[0].primary and vm.disks[0].image is not None
    assert not vm.disks[0].chained  # a disk block copies unless chained (the shorthand overlays)
    assert vm.gets_seed


def test_disk_blocks_get_the_cloud_init_seed_whatever_the_primary_is_made_of(
    images: Path,
) -> None:
    """Seed 002's python-server: cmds and a password next to `disk {}` blocks (no `image`)
    reach the guest through the seed, also for an empty or pool-volume primary; only
    cloud_init = false turns it off, and the options are then refused naming the first."""
    cloud = {"default_user_password": "password", "cmds": ["python3 -m http.server 8000"]}
    vm = parse(images, {**cloud, "disk": [{"size": "10GiB"}]})
    assert vm.gets_seed and vm.image is None
    with pytest.raises(ConfigError) as err:
        parse(images, {**cloud, "cloud_init": False, "disk": [{"size": "10GiB"}]})
    assert err.value.field == "config.default_user_password"
    assert "cloud_init = false" in str(err.value)


def test_the_shorthand_is_one_primary_disk(images: Path) -> None:
    vm = parse(images, {"image": str(images / "base.img"), "primary_disk_size": 100})
    (disk,) = vm.disks
    assert disk.primary and disk.chained and disk.size_bytes == 100 * MIB
    assert disk.field == "config.image" and disk.image_field == "config.image"


def test_a_cdrom_is_read_only(images: Path) -> None:
    vm = parse(
        images,
        {
            "kernel": str(images / "base.img"),
            "disk": [
                {"size": "1GiB"},
                {
                    "kind": "cdrom",
                    "bus_type": "sata",
                    "source": {"image": str(images / "base.img")},
                },
            ],
        },
    )
    assert vm.disks[1].read_only and vm.disks[1].kind == "cdrom"


@pytest.mark.parametrize(
    ("config", "field", "says"),
    [
        ({"image": "IMG", "disk": [{"size": "1GiB"}]}, "config.disk", "config.image"),
        ({"use_thin_copy": False, "disk": [{"size": "1GiB"}]}, "config.disk", "use_thin_copy"),
        (
            {"disk": [{"primary": True, "size": "1G"}, {"primary": True, "size": "1G"}]},
            "config.disk[1].primary",
            "only one",
        ),
        ({"disk": [{}]}, "config.disk[0].size", "needs a size"),
        ({"disk": [{"size": "1G", "bus_type": "usb"}]}, "config.disk[0].bus_type", "one of"),
        (
            {"os": {"machine": "q35"}, "disk": [{"size": "1G", "bus_type": "ide"}]},
            "config.disk[0].bus_type",
            "no IDE bus",
        ),
        (
            {
                "os": {"machine": "microvm"},
                "kernel": "IMG",
                "disk": [{"size": "1G", "bus_type": "sata"}],
            },
            "config.disk[0].bus_type",
            "microvm",
        ),
        ({"disk": [{"size": "1G", "bus_type": "ide"}] * 5}, "config.disk[4].bus_type", "at most 4"),
        (
            {"disk": [{"kind": "cdrom", "source": {"image": "IMG"}}]},
            "config.disk[0].bus_type",
            "no CD-ROM",
        ),
        (
            {"disk": [{"kind": "cdrom", "size": "1G", "bus_type": "ide"}]},
            "config.disk[0].source.image",
            "ISO",
        ),
        ({"disk": [{"kind": "floppy", "size": "1G"}]}, "config.disk[0].kind", "disk or cdrom"),
        # QEMU's IDE disk (sata and ide) refuses a read-only drive: said before QEMU runs.
        (
            {"disk": [{"size": "1G"}, {"size": "1G", "bus_type": "sata", "read_only": True}]},
            "config.disk[1].read_only",
            "scsi",
        ),
        (
            {"disk": [{"size": "1G", "bus_type": "ide", "read_only": True}]},
            "config.disk[0].read_only",
            "write protection",
        ),
        ({"disk": [{"size": "1G", "format": "vmdk"}]}, "config.disk[0].format", "qcow2 or raw"),
        ({"disk": [{"size": "1G", "chained": True}]}, "config.disk[0].chained", "source"),
        (
            {"disk": [{"chained": True, "format": "raw", "source": {"image": "IMG"}}]},
            "config.disk[0].format",
            "qcow2 overlay",
        ),
        (
            {"disk": [{"sparse": False, "source": {"image": "IMG"}}]},
            "config.disk[0].sparse",
            "empty disks",
        ),
        ({"disk": [{"size": "1G", "devname": "/dev/vdb"}]}, "config.disk[0].devname", "serial"),
        ({"disk": [{"size": "1G", "devname": "x" * 21}]}, "config.disk[0].devname", "20"),
        ({"disk": [{"size": "1G", "driver": "none"}]}, "config.disk[0].driver", "O_DIRECT"),
        ({"disk": [{"size": "1G", "driver": "io=native"}]}, "config.disk[0].driver", "O_DIRECT"),
        ({"disk": [{"size": "1G", "driver": "fast"}]}, "config.disk[0].driver", "unknown cache"),
        (
            {"disk": [{"source": {"image": "/etc/passwd"}}]},
            "config.disk[0].source.image",
            "outside the allowed",
        ),
        (
            {"disk": [{"source": {"image": "IMG", "format": "luks"}}]},
            "config.disk[0].source.format",
            "detected",
        ),
        # Pools: none configured in these tests; Nomad volume disks: test_volume_disks.py.
        ({"disk": [{"size": "10GiB", "pool": "local"}]}, "config.disk[0].pool", "no storage pool"),
        ({"disk": [{"size": "1G", "name": "data"}]}, "config.disk[0].pool", "needs a storage pool"),
        ({"disk": [{"source": {"volume": "focal.img"}}]}, "config.disk[0].pool", "storage_pools"),
        ({"disk": [{"size": "1G", "volume": "v"}]}, "config.disk[0].volume", "no volume_mount"),
    ],
)
def test_bad_disk_blocks_name_the_field(
    images: Path, config: dict[str, object], field: str, says: str
) -> None:
    image = str(images / "base.img")
    config = _with_image(config, image)
    with pytest.raises((ConfigError, ImageError)) as err:
        parse(images, config)
    assert err.value.field == field, err.value
    assert says in str(err.value)


def _with_image(value, image: str):  # type: ignore[no-untyped-def]
    """``IMG`` replaced by the test's image path, anywhere in the config."""
    if value == "IMG":
        return image
    if isinstance(value, dict):
        return {k: _with_image(v, image) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_image(v, image) for v in value]
    return value


POOLS = {
    "storage_pools": {
        "default": "local",
        "directory": {"local": {"path": "/srv/pool"}, "fast": {"path": "/srv/fast/"}},
        "ceph": {
            "remote": {
                "pool": "p",
                "hosts": ["192.0.2.1:3300"],
                "authentication": {
                    "username": "nomad",
                    "secret": "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ==",
                },
            }
        },
    }
}


def parse_pooled(images: Path, config: dict[str, object]):  # type: ignore[no-untyped-def]
    raw = {"image_paths": [str(images)], **POOLS}
    plugin = parse_plugin_config(raw, VIRT)
    return parse_task_config(unit_task(images.parent / "alloc", config), plugin)


def test_pool_disks_find_their_directory(images: Path) -> None:
    vm = parse_pooled(
        images,
        {
            "disk": [
                {"name": "root", "source": {"volume": "focal.img"}, "chained": True},
                {"pool": "fast", "size": "1G"},
                {"size": "1G"},
            ]
        },
    )
    named, fast, own = vm.disks
    assert (named.pool_dir, named.volume_name, named.source_volume) == (
        Path("/srv/pool"),
        "root",
        "focal.img",
    )
    assert named.persistent and named.chained
    assert fast.pool_dir == Path("/srv/fast") and not fast.persistent
    # No pool named: the default pool ("local", /srv/pool), as in nomad-driver-virt.
    assert own.pool_dir == Path("/srv/pool") and not own.persistent


def test_a_disk_without_pool_goes_to_the_default_pool_a_cdrom_stays_with_the_task(
    images: Path,
) -> None:
    iso = images / "install.iso"
    iso.write_bytes(b"\0" * 4096)
    ceph_default = {**POOLS["storage_pools"], "default": "remote"}
    raw = {"image_paths": [str(images)], "storage_pools": ceph_default}
    plugin = parse_plugin_config(raw, VIRT)
    config = {
        "disk": [
            {"size": "1G"},
            {"kind": "cdrom", "bus_type": "sata", "source": {"image": str(iso)}},
        ]
    }
    disk, cdrom = parse_task_config(unit_task(images.parent / "alloc", config), plugin).disks
    assert disk.ceph is not None and disk.ceph.label == "remote" and disk.format == "raw"
    assert cdrom.ceph is None and cdrom.pool_dir is None
    # Without storage_pools there is no default: the disk lives with the task.
    bare = parse_plugin_config({"image_paths": [str(images)]}, VIRT)
    (alone,) = parse_task_config(
        unit_task(images.parent / "alloc", {"disk": [{"size": "1G"}]}), bare
    ).disks
    assert alone.pool_dir is None and alone.ceph is None


def test_ceph_disks_are_raw_rbd_images_of_their_pool(images: Path) -> None:
    vm = parse_pooled(
        images,
        {
            "disk": [
                {"pool": "remote", "name": "data", "size": "1G"},
                {"pool": "remote", "chained": True, "source": {"volume": "data"}},
            ]
        },
    )
    named, clone = vm.disks
    assert named.ceph is not None and named.ceph.label == "remote" and named.pool_dir is None
    assert (named.format, named.persistent, named.in_file) == ("raw", True, False)
    assert clone.chained and clone.source_volume == "data" and not clone.persistent


@pytest.mark.parametrize(
    ("disk", "field", "says"),
    [
        ({"pool": "remote", "size": "1G", "format": "qcow2"}, "config.disk[0].format", "RBD"),
        ({"pool": "remote", "size": "1G", "sparse": False}, "config.disk[0].sparse", "thin"),
        (
            {"pool": "remote", "source": {"volume": "v", "format": "qcow2"}},
            "config.disk[0].source.format",
            "raw",
        ),
        ({"pool": "nope", "size": "1G"}, "config.disk[0].pool", "local, fast"),
        ({"name": "../etc", "size": "1G"}, "config.disk[0].name", "no '/'"),
        ({"name": ".hidden", "size": "1G"}, "config.disk[0].name", "volume name"),
        ({"source": {"volume": "a/b"}}, "config.disk[0].source.volume", "volume name"),
        ({"source": {"volume": "v", "image": "IMG"}}, "config.disk[0].source", "not both"),
        ({"source": {"volume": "v"}, "sparse": False}, "config.disk[0].sparse", "empty"),
    ],
)
def test_bad_pool_disks_name_the_field(
    images: Path, disk: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pooled(images, {"disk": [_with_image(disk, str(images / "base.img"))]})
    assert err.value.field == field, err.value
    assert says in str(err.value)


def test_two_disks_cannot_be_the_same_volume(images: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pooled(images, {"disk": [{"name": "v", "size": "1G"}, {"name": "v", "size": "1G"}]})
    assert err.value.field == "config.disk[1].name"


def test_only_qemu_takes_several_disks_and_their_device_options(images: Path) -> None:
    from nomad_vm.driver.startup import refuse_disk_options
    from nomad_vm.vm.cloud_hypervisor.backend import CAPABILITIES as CH
    from nomad_vm.vm.qemu.backend import CAPABILITIES as QEMU

    several = parse(images, {"disk": [{"size": "1G"}, {"size": "1G"}]})
    refuse_disk_options("qemu", QEMU, several)
    with pytest.raises(ConfigError) as err:
        refuse_disk_options("cloud-hypervisor", CH, several)
    assert err.value.field == "config.disk[1]" and "one disk" in str(err.value)
    serial = parse(images, {"disk": [{"size": "1G", "devname": "root"}]})
    with pytest.raises(ConfigError) as err:
        refuse_disk_options("cloud-hypervisor", CH, serial)
    assert err.value.field == "config.disk[0].devname"
    for key, value in (("read_only", True), ("driver", "unsafe")):
        with pytest.raises(ConfigError) as err:
            refuse_disk_options(
                "cloud-hypervisor", CH, parse(images, {"disk": [{"size": "1G", key: value}]})
            )
        assert err.value.field == f"config.disk[0].{key}"
    pooled = parse_pooled(images, {"disk": [{"size": "1G", "pool": "local"}]})
    with pytest.raises(ConfigError) as err:
        refuse_disk_options("cloud-hypervisor", CH, pooled)
    assert err.value.field == "config.disk[0].pool"
    refuse_disk_options("cloud-hypervisor", CH, parse(images, {"disk": [{"size": "1G"}]}))

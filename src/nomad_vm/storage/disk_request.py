"""A task's disks as asked for: the virt seed's `disk {}` blocks, or today's shorthand
(`image`, `use_thin_copy`, `primary_disk_size`) as one primary disk. Validation only: what
each disk becomes on the host is ``storage.disk`` (from a source) and ``storage.empty_disk``
(no source); what the guest sees is ``vm.qemu.disk_devices``.

Every error names the field as ``config.disk[i].<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from nomad_vm.errors import ConfigError
from nomad_vm.storage.ceph_pool import CephPool
from nomad_vm.storage.disk_device import KINDS, cache_mode, check_bus, check_read_only, serial_of
from nomad_vm.storage.image_url import ImageURL, UrlRules, image_source

FORMATS = ("qcow2", "raw")
# The virt seed's sizes: bytes, or a number with a decimal (kB, MB, ...) or binary (KiB, MiB,
# ...) unit; a bare letter (k, M, G, T) is binary, as in qemu-img.
UNITS = {
    "": 1,
    "b": 1,
    **{p.lower(): 1000**n for n, p in enumerate(("kB", "MB", "GB", "TB", "PB"), start=1)},
    **{p.lower(): 1024**n for n, p in enumerate(("KiB", "MiB", "GiB", "TiB", "PiB"), start=1)},
    **{p.lower(): 1024**n for n, p in enumerate(("K", "M", "G", "T", "P"), start=1)},
}
VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")
MIB = 1024 * 1024
# 64 TiB, as for primary_disk_size: a qcow2 of 1 PiB costs 16 MB of metadata up front.
MAX_SIZE = 64 * 1024**4


@dataclass(frozen=True)
class DiskRequest:
    """One disk of the task, validated. ``image`` is resolved and allowed (not yet opened)."""

    field: str  # `config.disk[i]`, or `config.image` for the shorthand
    primary: bool = False
    image: Path | None = None
    source_format: str = ""
    # The size asked for, in bytes (rounded up to a whole MiB); None: the source's.
    size_bytes: int | None = None
    size_field: str = ""
    chained: bool = False
    sparse: bool = True
    read_only: bool = False
    bus: str = "virtio"
    kind: str = "disk"
    serial: str = ""
    format: str = "qcow2"
    cache: str = "writeback"
    # A directory pool's host directory (``storage.pool``), when the disk uses one: its
    # `name` is a volume there that outlives the task; `source.volume` is one to clone.
    pool_dir: Path | None = None
    volume_name: str = ""
    source_volume: str = ""
    # The source image given by URL (``image`` is then None until it is in the node's cache).
    url: ImageURL | None = None
    # `volume`: the group volume backing the disk (``storage.volume_disk``). The driver fills
    # in the matching volume_mount (``driver.volume_disks``): its index among the task's
    # mounts, its host path, and whether it is read-only.
    nomad_volume: str = ""
    volume_mount: int | None = None
    volume_host: Path | None = None
    # A Ceph pool instead (``storage.ceph_pool``): the disk is an RBD image there, raw.
    ceph: CephPool | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.url is not None

    @property
    def persistent(self) -> bool:
        """Outlives the task: a pool volume, or the data of a Nomad volume."""
        return bool(self.volume_name or self.nomad_volume)

    @property
    def in_file(self) -> bool:
        """Is it a file in the task's runtime dir (not a pool volume, not an RBD image)?"""
        return not self.persistent and self.ceph is None

    @property
    def image_field(self) -> str:
        return self.field if self.field == "config.image" else f"{self.field}.source.image"

    @property
    def size_mb(self) -> int | None:
        return None if self.size_bytes is None else self.size_bytes // MIB

    def file_name(self, index: int) -> str:
        """Its file in the task's runtime dir: the primary keeps today's name (`disk.qcow2`)."""
        return f"disk{index or ''}.{self.format}"


def shorthand_disk(
    image: Path | None,
    thin: bool,
    size_mb: int | None,
    url: ImageURL | None = None,
    bus: str = "virtio",
) -> tuple[DiskRequest, ...]:
    """`image`/`use_thin_copy`/`primary_disk_size` as the one primary disk (none: no image);
    ``bus``: the guest profile's (sata for Windows guests)."""
    if image is None and url is None:
        return ()
    size = None if size_mb is None else size_mb * MIB
    return (
        DiskRequest(
            "config.image",
            primary=True,
            image=image,
            size_bytes=size,
            size_field="config.primary_disk_size",
            chained=thin,
            url=url,
            bus=bus,
        ),
    )


@dataclass(frozen=True)
class Pools:
    """The plugin's storage pools, as a disk block may name them."""

    directories: Mapping[str, Path] = field(default_factory=dict)
    ceph: Mapping[str, CephPool] = field(default_factory=dict)
    default: str = ""


def parse_disks(
    blocks: Sequence[Mapping[str, object]],
    resolve: Callable[[str, str], Path],
    machine: str,
    pools: Pools | None = None,
    url_rules: UrlRules | None = None,
    default_bus: str = "virtio",
) -> tuple[DiskRequest, ...]:
    """The `disk` blocks, the primary first (the one marked, else the first block).

    ``resolve(field, path)`` resolves an image path against the allowlist (ConfigError naming
    the field otherwise); ``machine`` is the task's machine type, for the buses it has;
    ``url_rules`` what the operator accepts of images given by URL.
    ``default_bus`` the bus of blocks that name none (the guest profile's).
    """
    pools = pools or Pools()
    rules = url_rules or UrlRules()
    disks = [
        _parse_one(f"config.disk[{i}]", b, resolve, machine, pools, rules, default_bus)
        for i, b in enumerate(blocks)
    ]
    seen: dict[tuple[object, str], str] = {}
    for d in disks:
        where = d.pool_dir or (d.ceph.label if d.ceph else None)
        if d.volume_name and (where, d.volume_name) in seen:
            other = seen[(where, d.volume_name)]
            raise ConfigError(f"{d.field}.name", f"{other} is already the volume {d.volume_name!r}")
        seen[(where, d.volume_name)] = d.field
    marked = [d for d in disks if d.primary]
    if len(marked) > 1:
        raise ConfigError(
            f"{marked[1].field}.primary",
            f"only one disk can be primary ({marked[0].field} already is)",
        )
    if disks and not marked:
        disks[0] = replace(disks[0], primary=True)
    disks.sort(key=lambda d: not d.primary)
    for bus, most in (("sata", 6), ("ide", 4)):
        on_bus = [d for d in disks if d.bus == bus]
        if len(on_bus) > most:
            raise ConfigError(
                f"{on_bus[most].field}.bus_type",
                f"at most {most} disks fit on the {bus} bus; put the others on virtio or scsi",
            )
    return tuple(disks)


def _parse_one(
    field: str,
    block: Mapping[str, object],
    resolve: Callable[[str, str], Path],
    machine: str,
    pools: Pools,
    rules: UrlRules,
    default_bus: str = "virtio",
) -> DiskRequest:
    source = block.get("source") if isinstance(block.get("source"), Mapping) else {}
    assert isinstance(source, Mapping)
    if block.get("volume"):
        # Its own module, which builds on this one's DiskRequest (hence imported here).
        from nomad_vm.storage.volume_request import volume_disk_request

        return volume_disk_request(field, block, source, machine)
    image_value = str(source.get("image") or "")
    checksum = str(source.get("checksum") or "")
    url = image_source(
        f"{field}.source.image", image_value, checksum, f"{field}.source.checksum", rules
    )
    image = resolve(f"{field}.source.image", image_value) if image_value and not url else None
    has_image = image is not None or url is not None
    name = _volume(f"{field}.name", str(block.get("name") or ""))
    source_volume = _volume(f"{field}.source.volume", str(source.get("volume") or ""))
    if has_image and source_volume:
        raise ConfigError(f"{field}.source", "give image or volume, not both")
    kind = str(block.get("kind") or "disk")
    if kind not in KINDS:
        raise ConfigError(f"{field}.kind", f"must be disk or cdrom; got {kind!r}")
    placed = _pool(field, str(block.get("pool") or ""), bool(name or source_volume), kind, pools)
    ceph = placed if isinstance(placed, CephPool) else None
    pool_dir = placed if isinstance(placed, Path) else None
    source_format = str(source.get("format") or "")
    if source_format and source_format not in ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc"):
        raise ConfigError(
            f"{field}.source.format",
            f"{source_format!r}: use qcow2, raw, vmdk, vdi, vhdx or vpc (or leave it out: "
            "the format is detected)",
        )
    size = parse_size(block.get("size"), f"{field}.size")
    if not has_image and size is None and not source_volume and not name:
        raise ConfigError(f"{field}.size", 'a disk without a source needs a size (e.g. "10GiB")')
    if kind == "cdrom" and not has_image and not source_volume:
        raise ConfigError(f"{field}.source.image", "a cdrom needs a source image (the ISO)")
    fmt = str(block.get("format") or ("raw" if ceph else "qcow2"))
    if fmt not in FORMATS:
        raise ConfigError(f"{field}.format", f"must be qcow2 or raw; got {fmt!r}")
    chained = bool(block.get("chained"))
    if chained and not has_image and not source_volume:
        raise ConfigError(f"{field}.chained", "an overlay needs a source: set source { image }")
    sparse = block.get("sparse") is not False
    if ceph is not None:
        _check_rbd(field, fmt, sparse, str(source.get("format") or ""), bool(source_volume))
    elif chained and fmt != "qcow2":
        raise ConfigError(f"{field}.format", "a chained disk is a qcow2 overlay: use qcow2")
    if not sparse and (has_image or source_volume):
        raise ConfigError(
            f"{field}.sparse",
            "a disk made from a source is a sparse copy or overlay; sparse = false "
            "(space reserved up front) applies to empty disks only",
        )
    bus = str(block.get("bus_type") or default_bus)
    check_bus(f"{field}.bus_type", bus, kind, machine)
    if block.get("read_only"):
        check_read_only(f"{field}.read_only", bus, kind)
    serial = serial_of(f"{field}.devname", str(block.get("devname") or ""))
    return DiskRequest(
        field,
        primary=bool(block.get("primary")),
        image=image,
        source_format=source_format,
        size_bytes=size,
        size_field=f"{field}.size",
        chained=chained,
        sparse=sparse,
        read_only=bool(block.get("read_only")) or kind == "cdrom",
        bus=bus,
        kind=kind,
        serial=serial,
        format=fmt,
        cache=cache_mode(f"{field}.driver", str(block.get("driver") or "")),
        pool_dir=pool_dir,
        volume_name=name,
        source_volume=source_volume,
        url=url,
        ceph=ceph,
    )


def _check_rbd(field: str, fmt: str, sparse: bool, source_format: str, volume: bool) -> None:
    """An RBD image is raw block storage: thin by nature, chained by cloning a snapshot."""
    if fmt != "raw":
        raise ConfigError(
            f"{field}.format",
            f"a disk in a Ceph pool is an RBD image, which is raw; got {fmt!r} (leave it out)",
        )
    if not sparse:
        raise ConfigError(
            f"{field}.sparse",
            "RBD images are always thin-provisioned: sparse = false cannot be honoured in a "
            "Ceph pool",
        )
    if volume and source_format not in ("", "raw"):
        raise ConfigError(
            f"{field}.source.format", f"a volume of a Ceph pool is raw; got {source_format!r}"
        )


def _volume(field: str, value: str) -> str:
    """A volume name: one path component of the pool, never hidden (the pool's own
    in-progress files start with a dot)."""
    if value and not VOLUME.fullmatch(value):
        raise ConfigError(
            field,
            f"{value!r} is not a volume name: 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/': a volume lives in its pool's directory)",
        )
    return value


def _pool(
    field: str, pool: str, needs_one: bool, kind: str, pools: Pools
) -> Path | CephPool | None:
    """The directory (or the Ceph pool) of the disk's pool: the one it names, else the
    default pool (as in nomad-driver-virt, whose `pool` "defaults to the default storage
    pool"); None: no pool is configured, and the disk lives with the task only. A CD-ROM
    without `pool` stays with the task: it is a read-only view of its ISO, nothing to keep."""
    if not pool and not needs_one and (kind == "cdrom" or not pools.default):
        return None
    pool = pool or pools.default
    if not pool:
        raise ConfigError(
            f"{field}.pool",
            "a named volume or source.volume needs a storage pool: configure "
            'storage_pools { directory "name" { path = ... } } in the plugin config',
        )
    if pool in pools.ceph:
        return pools.ceph[pool]
    if pool not in pools.directories:
        known = ", ".join([*pools.directories, *pools.ceph]) or "none"
        raise ConfigError(f"{field}.pool", f"no storage pool {pool!r} (pools: {known})")
    return pools.directories[pool]


def parse_size(value: object, field: str) -> int | None:
    """Bytes (a number or a string with a unit), rounded up to a whole MiB; None if unset."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(field, f"must be a size, got {value!r}")
    if isinstance(value, int | float) and float(value).is_integer():
        number, unit = int(value), ""
    else:
        match = SIZE.fullmatch(str(value))
        if match is None or match.group(2).lower() not in UNITS:
            raise ConfigError(
                field, f'{value!r} is not a size: use bytes or a unit, e.g. "10GiB" or "20GB"'
            )
        number, unit = int(match.group(1)), match.group(2).lower()
    size: int = number * UNITS[unit]
    if size <= 0:
        raise ConfigError(field, f"{value!r}: must be larger than zero")
    if size > MAX_SIZE:
        raise ConfigError(field, f"{value!r} is larger than the maximum of 64TiB")
    return -(-size // MIB) * MIB

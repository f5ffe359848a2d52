"""A `disk {}` block backed by a Nomad volume (`volume = "<group volume>"`), validated.

The disk is the volume's data: nothing it would be made from (a source, a pool, an overlay)
applies, and the driver never removes it. Which volume_mount it is, and so which host path,
is decided by ``driver.volume_disks``; what is opened or made there by
``storage.volume_disk``. Errors name the field as ``config.disk[i].<key>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from nomad_vm.errors import ConfigError
from nomad_vm.storage.disk_device import KINDS, cache_mode, check_bus, check_read_only, serial_of
from nomad_vm.storage.disk_request import FORMATS, DiskRequest, parse_size


def volume_disk_request(
    field: str, block: Mapping[str, object], source: Mapping[str, object], machine: str
) -> DiskRequest:
    """A disk backed by a Nomad volume (`volume`): the volume's data, so nothing it would be
    made from (a source, a pool, an overlay) applies; its format is the block's `format` or
    `source.format` (then never probed), else detected, or qcow2 for the file nomad-vm makes
    in a directory volume."""
    name = str(block.get("volume"))
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"{field}.volume", f"{name!r}: give a group volume's name (no '/')")
    for key, value in (
        ("pool", block.get("pool")),
        ("name", block.get("name")),
        ("chained", block.get("chained")),
        ("source.image", source.get("image")),
        ("source.volume", source.get("volume")),
    ):
        if value:
            raise ConfigError(
                f"{field}.{key}",
                f"a disk backed by the Nomad volume {name!r} is that volume's data; remove "
                f"{key} (or volume)",
            )
    stated = {str(block.get("format") or ""), str(source.get("format") or "")} - {""}
    if len(stated) > 1:
        raise ConfigError(f"{field}.format", "format and source.format disagree; give one")
    fmt = stated.pop() if stated else ""
    if fmt and fmt not in FORMATS:
        raise ConfigError(f"{field}.format", f"must be qcow2 or raw; got {fmt!r}")
    kind = str(block.get("kind") or "disk")
    if kind not in KINDS:
        raise ConfigError(f"{field}.kind", f"must be disk or cdrom; got {kind!r}")
    bus = str(block.get("bus_type") or "virtio")
    check_bus(f"{field}.bus_type", bus, kind, machine)
    if block.get("read_only"):
        check_read_only(f"{field}.read_only", bus, kind)
    return DiskRequest(
        field,
        primary=bool(block.get("primary")),
        source_format=fmt,
        size_bytes=parse_size(block.get("size"), f"{field}.size"),
        size_field=f"{field}.size",
        sparse=block.get("sparse") is not False,
        read_only=bool(block.get("read_only")) or kind == "cdrom",
        bus=bus,
        kind=kind,
        serial=serial_of(f"{field}.devname", str(block.get("devname") or "")),
        format=fmt or "qcow2",
        cache=cache_mode(f"{field}.driver", str(block.get("driver") or "")),
        nomad_volume=name,
    )

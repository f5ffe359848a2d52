"""A task's disks from its config: the `disk` blocks (``storage.disk_request``, pools from
the plugin's `storage_pools`, each `volume` disk given its volume_mount) or the `image`
shorthand's one disk; both in one task is an error naming both. Paths are resolved against
the task's allowlist; images given by URL are checked against the plugin's rules."""

from __future__ import annotations

from collections.abc import Mapping

from nomad_vm.driver.seed_keys import SeedPluginKeys
from nomad_vm.driver.types import TaskConfig
from nomad_vm.driver.volume_disks import attach_volume_mounts
from nomad_vm.errors import ConfigError
from nomad_vm.fields import field_list
from nomad_vm.storage.disk_request import DiskRequest, Pools, parse_disks, shorthand_disk
from nomad_vm.storage.image_url import UrlRules, image_source
from nomad_vm.storage.paths import Allowlist, resolve_allowed_file


def task_disks(
    task: TaskConfig,
    values: Mapping[str, object],
    allowed: Allowlist,
    machine: str,
    seed: SeedPluginKeys,
    url_rules: UrlRules,
    default_bus: str = "virtio",
) -> tuple[DiskRequest, ...]:
    """The `disk` blocks, or the shorthand's one disk; both in one task is an error naming
    both, since either alone describes the boot disk."""
    blocks = values["disk"]
    if not blocks:
        image = str(values["image"] or "")
        checksum = str(values["image_checksum"] or "")
        url = image_source("config.image", image, checksum, "config.image_checksum",
                           url_rules)  # fmt: skip
        path = (
            resolve_allowed_file("config.image", image, allowed, task.task_dir)
            if image and url is None
            else None
        )
        size = values["primary_disk_size"]
        thin = values["use_thin_copy"] is not False  # unset: an overlay
        return shorthand_disk(path, thin, size, url, default_bus)  # type: ignore[arg-type]
    shorthand = [
        f"config.{name}"
        for name in ("image", "image_checksum", "use_thin_copy", "primary_disk_size")
        if (task.driver_config or {}).get(name) is not None
    ]
    if shorthand:
        raise ConfigError(
            "config.disk",
            f"disk blocks and {field_list(shorthand)} both describe the boot disk: use one form "
            "(a primary disk with source { image = ... } replaces image)",
        )
    assert isinstance(blocks, list)
    pools = Pools(seed.directory_pools, seed.ceph, seed.default_pool)
    disks = parse_disks(
        blocks,
        lambda field, path: resolve_allowed_file(field, path, allowed, task.task_dir),
        machine,
        pools,
        url_rules,
        default_bus,
    )
    return attach_volume_mounts(disks, task.mounts)

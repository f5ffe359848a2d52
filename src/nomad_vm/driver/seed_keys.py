"""The seed drivers' keys nomad-vm accepts but does not act on yet (nomad_vm.schema.seed_keys):
plugin keys become warnings and node attributes, task keys that a job relies on become errors
naming the key. Nothing is dropped silently."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from nomad_vm.errors import ConfigError
from nomad_vm.network.settings import parse_ipv4
from nomad_vm.storage.ceph_pool import CephPool, parse_ceph_pool

LIBVIRT_IGNORED = (
    "ignored: nomad-vm runs QEMU directly, without libvirt, so the libvirt connection "
    "settings (provider, emulator) have no effect"
)


@dataclass(frozen=True)
class SeedPluginKeys:
    """What the plugin config's seed keys amount to."""

    # Name servers for guests that set none.
    dns: tuple[IPv4Address, ...] = ()
    # Which libvirt blocks were given (`provider "libvirt"`, `emulator`); empty: none.
    libvirt_blocks: tuple[str, ...] = ()
    # The storage pools as configured ("directory local", "ceph remote"), and the default's name.
    storage_pools: tuple[str, ...] = ()
    default_pool: str = ""
    # The directory pools nomad-vm serves: name -> the host directory holding their volumes.
    directory_pools: Mapping[str, Path] = field(default_factory=dict)
    # The Ceph pools nomad-vm serves (RBD images QEMU opens itself): name -> the pool.
    ceph: Mapping[str, CephPool] = field(default_factory=dict)
    # nomad-driver-ch's `vfio {}` block was given.
    vfio: bool = False

    def warnings(self) -> list[str]:
        """One line per key that is accepted and not acted on, for the agent log."""
        out = []
        if self.libvirt_blocks:
            out.append(f"plugin config {' and '.join(self.libvirt_blocks)}: {LIBVIRT_IGNORED}")
        if self.vfio:
            out.append(
                "plugin config vfio: PCI passthrough is not supported yet; tasks that list "
                "vfio_devices are refused"
            )
        return out

    def attributes(self, prefix: str) -> dict[str, str]:
        """Node attributes that say the same (``prefix``: `driver.<name>.`)."""
        attrs = {}
        if self.libvirt_blocks:
            attrs[f"{prefix}libvirt"] = LIBVIRT_IGNORED
        if self.storage_pools:
            pools = ", ".join(self.storage_pools)
            attrs[f"{prefix}storage_pools"] = f"{pools} (default {self.default_pool})"
        if self.vfio:
            attrs[f"{prefix}vfio"] = "not supported yet: configured, not used"
        return attrs


def parse_seed_plugin_keys(values: Mapping[str, object]) -> SeedPluginKeys:
    """The validated plugin config's seed keys; bad values are ConfigErrors naming the field."""
    dns = tuple(
        parse_ipv4(str(d), f"config.dns[{i}]") for i, d in enumerate(_list(values.get("dns")))
    )
    libvirt = []
    providers = values.get("provider")
    if isinstance(providers, Mapping):
        for label in providers:
            if label != "libvirt":
                raise ConfigError(
                    f"config.provider.{label}",
                    'unknown provider: nomad-driver-virt knows only "libvirt", and nomad-vm '
                    "needs none (it runs QEMU directly)",
                )
            libvirt.append('provider "libvirt"')
    if values.get("emulator") is not None:
        libvirt.append("emulator")
    pools, default, directories, ceph = _storage_pools(values.get("storage_pools"))
    return SeedPluginKeys(
        dns,
        tuple(libvirt),
        pools,
        default,
        directories,
        ceph,
        vfio=values.get("vfio") is not None,
    )


def _storage_pools(
    raw: object,
) -> tuple[tuple[str, ...], str, dict[str, Path], dict[str, CephPool]]:
    """The pools' descriptions and the default pool, checked as nomad-driver-virt checks them:
    a directory pool has an absolute path, a Ceph pool its pool name, monitors and a cephx
    key (``ceph_pool.parse_ceph_pool``), and the default names a defined pool (a single pool
    is the default)."""
    if not isinstance(raw, Mapping):
        return (), "", {}, {}
    names: list[str] = []
    directories: dict[str, Path] = {}
    ceph: dict[str, CephPool] = {}
    described: list[str] = []
    for kind in ("directory", "ceph"):
        blocks = raw.get(kind)
        for name, body in (blocks if isinstance(blocks, Mapping) else {}).items():
            field = f"config.storage_pools.{kind}.{name}"
            body = body if isinstance(body, Mapping) else {}
            if kind == "directory":
                path = str(body.get("path") or "")
                if not Path(path).is_absolute():
                    raise ConfigError(f"{field}.path", f"must be an absolute path, got {path!r}")
                directories[name] = Path(os.path.normpath(path))
            else:
                ceph[name] = parse_ceph_pool(name, body)
            if name in names:
                raise ConfigError(field, f"a pool named {name!r} is already defined")
            names.append(name)
            described.append(f"{kind} {name}")
    default = str(raw.get("default") or "")
    if default and default not in names:
        raise ConfigError(
            "config.storage_pools.default",
            f"{default!r} is not a defined pool (defined: {', '.join(names) or 'none'})",
        )
    if not default and len(names) == 1:
        default = names[0]
    if len(names) > 1 and not default:
        raise ConfigError(
            "config.storage_pools.default", "several pools are defined: name the default one"
        )
    return tuple(described), default, directories, ceph


def refuse_unsupported_task_keys(values: Mapping[str, object]) -> None:
    """A task that relies on a seed key nomad-vm cannot honour yet is refused, naming the key:
    running it without would give the job something other than what it asked for."""
    # os.variant is served: driver/guest_profile.py.
    for key, what in (("usb_devices", "USB"), ("vfio_devices", "PCI (VFIO)")):
        if _list(values.get(key)):
            raise ConfigError(
                f"config.{key}",
                f"{what} passthrough is not supported yet by nomad-vm; remove {key} (an empty "
                "list is accepted)",
            )


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []

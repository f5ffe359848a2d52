"""Which driver this process is: `vm`, or a seed driver's name it was installed under.

Nomad starts every executable in its plugin_dir, looks up the `plugin "<file name>"` block for
it, and registers the driver under the name PluginInfo returns. So the same program installed as
`nomad-driver-virt` must answer `virt` (the name nomad-driver-virt's jobs use) and as
`nomad-driver-ch` answer `nomad-driver-ch`. It learns which from ``NOMAD_VM_DRIVER_AS`` (set by the
wrapper `nomad-vm install --as` writes; the wrapper execs the real console script, so argv[0] is
that script's path) or else from the name it was started by (a symlink or a copy in plugin_dir).

Two names on one node must not share state, addresses or rules: each gets its own default
data_dir, bridge and TAP prefix, nftables table and journal directory, and its node attributes
are `driver.<name>.*`. (`virt` and `virt-legacy` share a bridge default, libvirt's `virbr0`:
they are one file name, so a node has one of them.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set by the wrapper `nomad-vm install --as NAME` writes: one of ALIASES' keys.
ENV_VAR = "NOMAD_VM_DRIVER_AS"


@dataclass(frozen=True)
class Identity:
    # What `nomad-vm install --as` and ENV_VAR call it: "vm", "virt", "ch".
    alias: str
    # The executable's name in plugin_dir, and so the `plugin "<file>"` block Nomad reads.
    file_name: str
    # The name jobs use (`driver = "..."`), PluginInfo's name.
    driver_name: str
    data_dir: Path
    bridge: str
    # 1 to 7 characters (TAP names are <prefix><hash>, 15 characters in all).
    tap_prefix: str
    # The nftables tables (ip and bridge families) holding this driver's rules.
    nft_table: str
    # Directory names under data_dir: the task journals and the network state (leases, DHCP).
    journal_dir: str
    network_dir: str
    # Defaults of the plugin's `network {}` block besides bridge and tap_prefix; when there
    # are any, a config without the block gets one of these defaults (libvirt's network).
    network_defaults: tuple[tuple[str, object], ...] = ()

    @property
    def network_block_defaults(self) -> dict[str, object]:
        """The `network {}` block's defaults that differ by name (the schema's and, with
        ``network_defaults``, the block a config without one gets)."""
        return {"bridge": self.bridge, "tap_prefix": self.tap_prefix, **dict(self.network_defaults)}

    @property
    def attribute_prefix(self) -> str:
        """Node attributes: `driver.<registered name>.`, as Nomad shows a driver's own."""
        return f"driver.{self.driver_name}."

    @property
    def is_own_name(self) -> bool:
        return self.alias == "vm"

    @property
    def seed(self) -> str:
        """The seed driver this name stands in for ("" for nomad-vm's own)."""
        return "" if self.is_own_name else self.file_name


# libvirt's default network, the one nomad-driver-virt's VMs join (its jobs say
# `bridge { name = "virbr0" }` and its client configs have no network block: libvirt made the
# bridge). Installed as nomad-driver-virt, nomad-vm runs that bridge itself by default.
LIBVIRT_BRIDGE = "virbr0"
LIBVIRT_NETWORK: tuple[tuple[str, object], ...] = (
    ("subnet_cidr", "192.168.122.0/24"),
    ("create_bridge", True),
)


def _seed_identity(alias: str, file_name: str, driver_name: str, **overrides: Any) -> Identity:
    values: dict[str, Any] = {
        "alias": alias,
        "file_name": file_name,
        "driver_name": driver_name,
        "data_dir": Path(f"/var/lib/nomad-vm-{alias}"),
        "bridge": f"nomadvm-{alias}0",
        "tap_prefix": f"n{alias}"[:7],
        "nft_table": f"nomad_vm_{alias}",
        "journal_dir": f"journal-{alias}",
        "network_dir": f"network-{alias}",
    }
    return Identity(**(values | overrides))


OWN = Identity(
    alias="vm",
    file_name="nomad-driver-vm",
    driver_name="vm",
    data_dir=Path("/var/lib/nomad-vm"),
    bridge="nomadvm0",
    tap_prefix="nvm",
    nft_table="nomad_vm",
    journal_dir="journal",
    network_dir="network",
)

ALIASES: Mapping[str, Identity] = {
    "vm": OWN,
    # nomad-driver-virt's current jobs say `driver = "virt"` (its older README said
    # "nomad-driver-virt"); its client config is `plugin "nomad-driver-virt"`.
    "virt": _seed_identity(
        "virt",
        "nomad-driver-virt",
        "virt",
        bridge=LIBVIRT_BRIDGE,
        network_defaults=LIBVIRT_NETWORK,
    ),
    # nomad-driver-ch registers under its file name: `driver = "nomad-driver-ch"`.
    "ch": _seed_identity("ch", "nomad-driver-ch", "nomad-driver-ch"),
    # nomad-driver-virt's earlier README (seed 001): the same `plugin "nomad-driver-virt"`
    # file, but its jobs say `driver = "nomad-driver-virt"`. One file name cannot answer both,
    # so this one is chosen only by the wrapper's variable (`install --as virt-legacy`); its
    # defaults are its own so that it never shares state with a `virt` elsewhere.
    "virt-legacy": _seed_identity(
        "virt-legacy",
        "nomad-driver-virt",
        "nomad-driver-virt",
        bridge=LIBVIRT_BRIDGE,
        network_defaults=LIBVIRT_NETWORK,
        tap_prefix="nvleg",
        nft_table="nomad_vm_virt_legacy",
    ),
}

# A bare executable name picks the current seed's name: `nomad-driver-virt` is `virt`.
_BY_FILE = {
    identity.file_name: identity for identity in ALIASES.values() if identity.alias != "virt-legacy"
}


class UnknownName(ValueError):
    """ENV_VAR names no identity."""


def detect(argv0: str, environ: Mapping[str, str]) -> Identity:
    """The identity from the wrapper's variable, else from the executable's own name; anything
    else (the console script itself, `python -m`) is nomad-vm's own `vm`."""
    alias = environ.get(ENV_VAR, "").strip()
    if alias:
        try:
            return ALIASES[alias]
        except KeyError:
            known = ", ".join(sorted(ALIASES))
            raise UnknownName(
                f"{ENV_VAR}={alias!r} names no driver: use one of {known} "
                "(or rerun `nomad-vm install --as`)"
            ) from None
    name = Path(argv0).name
    name = name.removesuffix(".exe")
    return _BY_FILE.get(name, OWN)


_current: Identity | None = None


def current(argv: Sequence[str] | None = None) -> Identity:
    """This process's identity, found once (the plugin's main calls it first, so an unknown
    ENV_VAR stops it before the handshake)."""
    global _current
    if _current is None:
        args = sys.argv if argv is None else argv
        _current = detect(args[0] if args else "", os.environ)
    return _current

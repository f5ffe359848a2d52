"""A file-backed IPv4 address pool: which task (owner) holds which address on a bridge.

The leases live in one JSON file, ``{"version": 1, "subnet": "10.99.0.0/24", "leases":
{owner: "10.99.0.2"}}``, so they survive plugin restarts; ``reconcile`` drops the leases of
tasks that did not survive.

Every operation holds an exclusive ``flock`` on a *separate* lock file (``<file>.lock``) from
reading the leases to writing them back, so two plugin processes (or threads, each opening the
lock file anew) never hand out the same address. The data file itself cannot carry the lock:
it is replaced on every write (temporary file, fsync, ``os.replace``), and a lock on the old
inode would not exclude a process that opened the new one. The rename keeps the file whole
across a crash: readers see the old leases or the new ones, never half a JSON document.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.files import exclusive_lock, write_atomically

FORMAT_VERSION = 1
STATIC_FIELD = "config.network_interface.bridge.static_ip"


class AddressPool:
    """Leases of addresses from ``start``..``end`` (inclusive) in ``subnet``, kept in ``path``.

    Static addresses may lie anywhere in the subnet (outside the range is the usual choice);
    the dynamic range is only where ``allocate`` looks for a free address itself.
    """

    def __init__(
        self,
        path: Path,
        subnet: IPv4Network,
        gateway: IPv4Address,
        start: IPv4Address,
        end: IPv4Address,
    ) -> None:
        if subnet.prefixlen > 30:
            raise ConfigError(
                "network.subnet_cidr",
                f"{subnet} has no room for a gateway and guests; use a /30 or larger network",
            )
        _require_host(subnet, gateway, "network.gateway")
        _require_host(subnet, start, "network.ip_pool_start")
        _require_host(subnet, end, "network.ip_pool_end")
        if start > end:
            raise ConfigError(
                "network.ip_pool_end",
                f"{end} is below network.ip_pool_start {start}; the range is inclusive, "
                "give its lowest address as the start",
            )
        if start == end == gateway:
            raise ConfigError(
                "network.ip_pool_start",
                f"the pool {start}-{end} holds only the gateway {gateway}: widen the range",
            )
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.subnet = subnet
        self.gateway = gateway
        self.start = start
        self.end = end

    def allocate(self, owner: str, static: IPv4Address | None = None) -> IPv4Address:
        """The owner's address: its existing lease, ``static``, or the lowest free one.

        Idempotent: an owner that already holds a lease gets it back. With ``static`` given and
        different from the owner's lease, the lease moves to ``static`` (after validation).
        """
        _check_owner(owner)
        with self._locked() as leases:
            current = leases.get(owner)
            if current is not None and static in (None, current):
                return current
            if static is not None:
                self._validate_static(static, owner, leases)
                address = static
            else:
                address = self._first_free(leases)
            leases[owner] = address
            self._write(leases)
            return address

    def release(self, owner: str) -> None:
        """Drop the owner's lease, if it has one."""
        _check_owner(owner)
        with self._locked() as leases:
            if leases.pop(owner, None) is not None:
                self._write(leases)

    def leases(self) -> dict[str, IPv4Address]:
        with self._locked() as leases:
            return dict(leases)

    def reconcile(self, live_owners: set[str]) -> list[str]:
        """Drop the leases of owners not in ``live_owners``; return those owners, sorted.

        For a restarted plugin: tasks that died while it was away must not keep their
        addresses forever.
        """
        with self._locked() as leases:
            dead = sorted(owner for owner in leases if owner not in live_owners)
            if dead:
                for owner in dead:
                    del leases[owner]
                self._write(leases)
            return dead

    def _validate_static(
        self, address: IPv4Address, owner: str, leases: dict[str, IPv4Address]
    ) -> None:
        if address not in self.subnet:
            raise ConfigError(STATIC_FIELD, f"{address} is outside the bridge subnet {self.subnet}")
        if address == self.subnet.network_address:
            raise ConfigError(
                STATIC_FIELD, f"{address} is the network address of {self.subnet}, not a host"
            )
        if address == self.subnet.broadcast_address:
            raise ConfigError(
                STATIC_FIELD, f"{address} is the broadcast address of {self.subnet}, not a host"
            )
        if address == self.gateway:
            raise ConfigError(
                STATIC_FIELD, f"{address} is the bridge's gateway address; choose another"
            )
        for other, leased in leases.items():
            if leased == address and other != owner:
                raise ConfigError(
                    STATIC_FIELD, f"{address} is already in use by another task ({other})"
                )

    def _first_free(self, leases: dict[str, IPv4Address]) -> IPv4Address:
        used = set(leases.values())
        used.add(self.gateway)
        for value in range(int(self.start), int(self.end) + 1):
            candidate = IPv4Address(value)
            if candidate not in used:
                return candidate
        raise NetworkError(
            f"IP pool {self.start}-{self.end} of {self.subnet} is exhausted "
            f"({len(leases)} leases in {self.path}): stop a task, or widen "
            "network.ip_pool_start/network.ip_pool_end"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, IPv4Address]]:
        """The leases, read while holding the exclusive lock (held until the block ends)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.lock_path))
            except OSError as exc:
                raise NetworkError(f"cannot open the IP pool lock {self.lock_path}: {exc}") from exc
            yield self._read()

    def discard_if_empty(self) -> bool:
        """Delete the lease file and its lock file when no lease is left (a pool that belongs to
        something that is going away, e.g. an allocation's network namespace); True if done."""
        with self._locked() as leases:
            if leases:
                return False
            self.path.unlink(missing_ok=True)
            # Still holding the lock: whoever waits on this inode notices and reopens the path.
            self.lock_path.unlink(missing_ok=True)
            return True

    def _read(self) -> dict[str, IPv4Address]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise NetworkError(f"cannot read the IP lease file {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
            return _parse(data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise NetworkError(
                f"the IP lease file {self.path} is corrupt ({exc}); the addresses of running "
                "VMs are recorded there: repair it, or stop all VMs on this bridge and delete it"
            ) from exc

    def _write(self, leases: dict[str, IPv4Address]) -> None:
        data = {
            "version": FORMAT_VERSION,
            "subnet": str(self.subnet),
            "leases": {owner: str(leases[owner]) for owner in sorted(leases)},
        }
        payload = json.dumps(data, indent=1).encode("utf-8") + b"\n"
        try:
            write_atomically(self.path, payload)
        except OSError as exc:
            raise NetworkError(f"cannot write the IP lease file {self.path}: {exc}") from exc


def _parse(data: Any) -> dict[str, IPv4Address]:
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected a JSON object with version {FORMAT_VERSION}")
    raw = data["leases"]
    if not isinstance(raw, dict):
        raise ValueError("'leases' is not an object")
    return {str(owner): IPv4Address(address) for owner, address in raw.items()}


def _require_host(subnet: IPv4Network, address: IPv4Address, field: str) -> None:
    if address not in subnet:
        raise ConfigError(field, f"{address} is outside the bridge subnet {subnet}")
    if address in (subnet.network_address, subnet.broadcast_address):
        raise ConfigError(
            field, f"{address} is the network or broadcast address of {subnet}, not a host"
        )


def _check_owner(owner: str) -> None:
    if not owner:
        raise ValueError("owner must not be empty")

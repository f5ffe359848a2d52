"""A VM task's bridge networking, host side: address, TAP, port forwards, and their teardown.

Start order, each step recorded before it is taken, so that whatever happens in between (an
error, a plugin SIGKILLed mid-start) ``teardown`` can undo exactly what exists:

1. the task's record is written to ``<data_dir>/network/tasks/<hash>.json``;
2. the bridge is made ready (created when ``create_bridge``; guard rules, IP forwarding, NAT);
3. the address is leased (``static_ip`` or the pool) and added to the record;
4. the TAP is created on the bridge (its name and MAC derive from the task id);
5. the port forwards are set in the plugin's nftables table.

``teardown`` removes rules, TAP, lease and finally the record; every step is idempotent. The
record also travels in driver_state, but the file is what a new plugin process finds for a task
whose StartTask never returned (Nomad then has no handle to give back).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from nomad_vm.driver.types import NetworkOverride, PortMapping
from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network import links, sysctl
from nomad_vm.network.names import mac_address, tap_mac, tap_name
from nomad_vm.network.nft import PortForward, PortForwarder
from nomad_vm.network.settings import NIC_FIELD, BridgeNetwork, NicRequest

log = logging.getLogger(__name__)

PORTS_FIELD = f"{NIC_FIELD}.bridge.ports"


@dataclass(frozen=True)
class NetworkPlan:
    """What a task's NIC will be, validated before anything exists on the host."""

    owner: str  # the task id
    net: BridgeNetwork
    nic: NicRequest
    tap: str
    guest_mac: str
    forwards: tuple[tuple[str, PortForward], ...]  # (label, forward)


@dataclass(frozen=True)
class NetworkRecord:
    """What exists (or may exist) on the host for one task; enough to remove all of it."""

    owner: str
    bridge: str
    tap: str
    guest_mac: str
    address: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NetworkRecord:
        return cls(**{k: str(raw[k]) for k in ("owner", "bridge", "tap", "guest_mac")},
                   address=str(raw.get("address", "")))  # fmt: skip


@dataclass(frozen=True)
class NetworkAttachment:
    """The result of a successful setup: the guest's address and how to reach it."""

    record: NetworkRecord
    address: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    port_map: Mapping[str, int]

    @property
    def override(self) -> NetworkOverride:
        return NetworkOverride(str(self.address), dict(self.port_map))


def plan_network(
    owner: str, nic: NicRequest | None, net: BridgeNetwork | None, ports: tuple[PortMapping, ...]
) -> NetworkPlan | None:
    if nic is None:
        return None
    if net is None:
        raise ConfigError(
            NIC_FIELD,
            "this node's plugin has no bridge network: set network { subnet_cidr = ... } in the "
            'plugin "nomad-driver-vm" config block',
        )
    if nic.bridge and nic.bridge != net.bridge:
        raise ConfigError(
            f"{NIC_FIELD}.bridge.name",
            f"{nic.bridge!r} is not the plugin's bridge {net.bridge!r}; leave it unset or use that",
        )
    if nic.vlan is not None and not 1 <= nic.vlan <= 4094:
        raise ConfigError(f"{NIC_FIELD}.vlan", f"{nic.vlan} is not a VLAN id: use 1 to 4094")
    by_label = {p.label: p for p in ports}
    forwards = []
    for i, label in enumerate(nic.ports):
        port = by_label.get(label)
        if port is None:
            known = ", ".join(sorted(by_label)) or "none"
            raise ConfigError(
                f"{PORTS_FIELD}[{i}]",
                f"no port labelled {label!r} in the group's network block (ports: {known})",
            )
        host_ip = IPv4Address(port.host_ip) if _is_ipv4(port.host_ip) else None
        forwards.append((label, PortForward(port.value, port.to or port.value, "tcp", host_ip)))
    return NetworkPlan(
        owner=owner,
        net=net,
        nic=nic,
        tap=tap_name(net.tap_prefix, owner),
        guest_mac=mac_address(owner),
        forwards=tuple(forwards),
    )


class NetworkManager:
    """Sets up and tears down task networks on this host; the record files live in
    ``state_dir`` (the plugin's data_dir/network)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.forwarder = PortForwarder()

    async def setup(self, plan: NetworkPlan) -> NetworkAttachment:
        return await asyncio.to_thread(self._setup, plan)

    async def teardown(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        await asyncio.to_thread(self._teardown, record, net)

    async def teardown_leftover(self, owner: str, net: BridgeNetwork | None) -> bool:
        """Tear down what a record file says exists for ``owner`` (a task this process never
        started, e.g. after a crash mid-start); False when there is no record."""
        record = self._read_record(owner)
        if record is None:
            return False
        await self.teardown(record, net)
        return True

    # -- blocking work, in a thread ----------------------------------------------------------

    def _setup(self, plan: NetworkPlan) -> NetworkAttachment:
        net, nic = plan.net, plan.nic
        record = NetworkRecord(plan.owner, net.bridge, plan.tap, plan.guest_mac)
        stale = self._read_record(plan.owner)
        if stale is not None:  # a retried start of the same task: start clean
            self._teardown(stale, net)
        self._write_record(record)
        try:
            self._prepare_bridge(net, vlan=nic.vlan is not None)
            address = net.pool(self.state_dir).allocate(plan.owner, nic.static_ip)
            record = NetworkRecord(plan.owner, net.bridge, plan.tap, plan.guest_mac, str(address))
            self._write_record(record)
            links.create_tap(plan.tap, net.bridge, mac=tap_mac(plan.guest_mac), vlan=nic.vlan)
            if plan.forwards:
                forwards = [f for _, f in plan.forwards]
                self.forwarder.set_port_forwards(plan.owner, address, forwards)
        except BaseException:
            self._teardown(record, net)
            raise
        return NetworkAttachment(
            record=record,
            address=address,
            prefixlen=nic.prefixlen or net.subnet.prefixlen,
            gateway=nic.gateway or net.gateway,
            dns=nic.dns,
            port_map={label: f.guest_port for label, f in plan.forwards},
        )

    def _prepare_bridge(self, net: BridgeNetwork, vlan: bool) -> None:
        if net.create_bridge:
            links.ensure_bridge(net.bridge, net.gateway_cidr, vlan_filtering=vlan)
        else:
            state = links.bridge_state(net.bridge)
            if not state.exists or not state.is_bridge:
                raise NetworkError(
                    f"bridge {net.bridge} does not exist on this host: create it, or set "
                    "create_bridge = true in the plugin's network block"
                )
        sysctl.enable_ip_forward()
        self.forwarder.prepare_bridge(net.bridge, net.subnet)
        if net.nat:
            self.forwarder.enable_nat(net.subnet, net.bridge)
        else:
            self.forwarder.disable_nat(net.bridge)

    def _teardown(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        failures = []
        for what, step in (
            ("port forwards", lambda: self.forwarder.remove_rules(record.owner)),
            (f"TAP {record.tap}", lambda: links.delete_link(record.tap)),
            ("address lease", lambda: self._release(record, net)),
        ):
            try:
                step()
            except Exception as exc:  # keep going: remove as much as possible
                failures.append(f"{what}: {exc}")
        if failures:
            # The record stays, so a later DestroyTask can try again.
            raise NetworkError(f"network teardown incomplete ({'; '.join(failures)})")
        self._record_path(record.owner).unlink(missing_ok=True)

    def _release(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        if net is None or net.bridge != record.bridge:
            if record.address:
                log.warning("cannot release %s: the plugin no longer has its bridge", record)
            return
        net.pool(self.state_dir).release(record.owner)

    # -- records -----------------------------------------------------------------------------

    def _record_path(self, owner: str) -> Path:
        digest = hashlib.sha256(owner.encode()).hexdigest()[:24]
        return self.state_dir / "tasks" / f"{digest}.json"

    def _write_record(self, record: NetworkRecord) -> None:
        path = self._record_path(record.owner)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read_record(self, owner: str) -> NetworkRecord | None:
        path = self._record_path(owner)
        with contextlib.suppress(FileNotFoundError):
            try:
                return NetworkRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError) as exc:
                raise NetworkError(f"network record {path} is unreadable: {exc}") from exc
        return None


def network_config(attachment: NetworkAttachment) -> dict[str, Any]:
    """cloud-init network-config v2 for the guest: the NIC matched by its MAC, static address,
    default route and name servers. No DHCP server is involved."""
    nic: dict[str, Any] = {
        "match": {"macaddress": attachment.record.guest_mac},
        "set-name": "eth0",
        "addresses": [f"{attachment.address}/{attachment.prefixlen}"],
        "routes": [{"to": "0.0.0.0/0", "via": str(attachment.gateway)}],
    }
    if attachment.dns:
        nic["nameservers"] = {"addresses": [str(d) for d in attachment.dns]}
    return {"version": 2, "ethernets": {"eth0": nic}}


def _is_ipv4(text: str) -> bool:
    try:
        IPv4Address(text)
    except ValueError:
        return False
    return True

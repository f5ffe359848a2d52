"""What a task's NIC will be, decided before anything exists on the host: the plan
(validated against the plugin's bridge and the group's ports), the record of what setup made,
the resulting attachment, and the guest's cloud-init network-config. Host changes are in
``networking``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from nomad_vm.driver.types import NetworkOverride, PortMapping
from nomad_vm.errors import ConfigError
from nomad_vm.network.names import DEFAULT_TAP_PREFIX, mac_address, tap_name
from nomad_vm.network.nft_rules import PortForward
from nomad_vm.network.settings import NIC_FIELD, BridgeNetwork, NicRequest

PORTS_FIELD = f"{NIC_FIELD}.bridge.ports"
# Group mode: the bridge the driver makes inside an allocation's network namespace, and its
# subnet. Private to the namespace, so the same for every allocation; chosen away from Nomad's
# default bridge_network_subnet (172.26.64.0/20) and the usual 10.x and 192.168.0/1.x LANs.
# Room for 13 VM tasks in one group (the gateway is .1).
GROUP_BRIDGE = "nvm0"
GROUP_SUBNET = IPv4Network("192.168.254.0/28")
GROUP_MODE = 'the group network mode (network { mode = "bridge" })'


@dataclass(frozen=True)
class NetworkPlan:
    """What a task's NIC will be, validated before anything exists on the host."""

    owner: str  # the task id
    net: BridgeNetwork
    nic: NicRequest
    tap: str
    guest_mac: str
    forwards: tuple[tuple[str, PortForward], ...]  # (label, forward)
    # Group mode: the path of the allocation's network namespace (empty: the plugin's bridge).
    netns: str = ""
    hostname: str = ""  # what DHCP mode tells the guest


@dataclass(frozen=True)
class NetworkRecord:
    """What exists (or may exist) on the host for one task; enough to remove all of it."""

    owner: str
    bridge: str
    tap: str
    guest_mac: str
    address: str = ""
    # Group mode: the allocation's network namespace (path) that bridge and TAP live in.
    netns: str = ""
    # "bridge" (a TAP on ``bridge``), or "macvtap": ``tap`` is then a macvtap link on the host
    # interface ``lower`` in ``mode``, and ``bridge`` is empty (journals before macvtap have
    # neither key: they are bridge records).
    kind: str = "bridge"
    lower: str = ""
    mode: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NetworkRecord:
        optional = {k: str(raw[k]) for k in ("address", "netns", "kind", "lower", "mode")
                    if k in raw}  # fmt: skip
        return cls(**{k: str(raw[k]) for k in ("owner", "bridge", "tap", "guest_mac")}, **optional)

    @property
    def is_macvtap(self) -> bool:
        return self.kind == "macvtap"


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
    def override(self) -> NetworkOverride | None:
        """What StartTask tells Nomad. Nothing in group mode: the VM's address there is private
        to the allocation's namespace (and the same in every allocation), so Nomad's own view,
        the node's address and host port or the allocation's address and ``to`` port, is what
        others can reach; both lead to the VM through Nomad's port mapping and our forward."""
        if self.record.netns:
            return None
        return NetworkOverride(str(self.address), dict(self.port_map))


def group_network(plugin_net: BridgeNetwork | None = None) -> BridgeNetwork:
    """The bridge inside an allocation's network namespace (group mode); the TAP prefix and
    DHCP mode are the plugin's."""
    hosts = list(GROUP_SUBNET.hosts())
    return BridgeNetwork(
        bridge=GROUP_BRIDGE,
        subnet=GROUP_SUBNET,
        gateway=hosts[0],
        pool_start=hosts[1],
        pool_end=hosts[-1],
        tap_prefix=plugin_net.tap_prefix if plugin_net is not None else DEFAULT_TAP_PREFIX,
        create_bridge=True,
        nat=True,
        dnsmasq=plugin_net.dnsmasq if plugin_net is not None else None,
    )


def plan_network(
    owner: str,
    nic: NicRequest | None,
    net: BridgeNetwork | None,
    ports: tuple[PortMapping, ...],
    netns: str = "",
    hostname: str = "",
) -> NetworkPlan | None:
    """The task's NIC: on the plugin's bridge ``net``, or (``netns``, the allocation's group
    network namespace) on a bridge inside that namespace."""
    if nic is None:
        return None
    if netns:
        return _plan_group_network(owner, nic, net, ports, netns, hostname)
    if net is None:
        raise ConfigError(
            NIC_FIELD,
            "this node's plugin has no bridge network: set network { subnet_cidr = ... } in the "
            "plugin's config block (plugin \"nomad-driver-vm\", or the seed driver name it is "
            "installed under)",
        )
    if nic.bridge and nic.bridge != net.bridge:
        raise ConfigError(
            f"{NIC_FIELD}.bridge.name",
            f"{nic.bridge!r} is not the plugin's bridge {net.bridge!r}; leave it unset or use that",
        )
    if nic.vlan is not None and not 1 <= nic.vlan <= 4094:
        raise ConfigError(f"{NIC_FIELD}.vlan", f"{nic.vlan} is not a VLAN id: use 1 to 4094")
    forwards = []
    for label, port in _ports(nic, ports):
        host_ip = IPv4Address(port.host_ip) if _is_ipv4(port.host_ip) else None
        forwards.append((label, PortForward(port.value, port.to or port.value, "tcp", host_ip)))
    return _plan(owner, net, nic, forwards, hostname=hostname)


def network_config(attachment: NetworkAttachment) -> dict[str, Any]:
    """cloud-init network-config v2 for the guest: the NIC matched by its MAC, static address,
    default route and name servers; the guest needs no DHCP server for it.

    The default route is ``gateway4``, not ``routes``: Debian's cloud-init renders ``routes``
    for ifupdown as ``post-up route add ...``, and images without net-tools have no ``route``
    command, so the guest silently had no default route (replies to other subnets were lost).
    ``gateway4`` becomes a native ``gateway`` line there, and every renderer supports it.
    """
    nic: dict[str, Any] = {
        "match": {"macaddress": attachment.record.guest_mac},
        "set-name": "eth0",
        "addresses": [f"{attachment.address}/{attachment.prefixlen}"],
        "gateway4": str(attachment.gateway),
    }
    if attachment.dns:
        nic["nameservers"] = {"addresses": [str(d) for d in attachment.dns]}
    return {"version": 2, "ethernets": {"eth0": nic}}


def network_event(network: NetworkAttachment, plan: NetworkPlan, has_seed: bool) -> str:
    """The "Network: ..." task event: the address, the TAP, and how the guest learns it."""
    where = f" in {network.record.netns}" if network.record.netns else ""
    text = f"Network: {network.address} on {network.record.tap}{where}"
    if plan.net.dnsmasq is not None:
        return f"{text}, served by DHCP to {network.record.guest_mac}"
    if not has_seed:
        # Not an error: the image may well configure this very address itself.
        return (
            f"{text}; the guest has no cloud-init seed and the plugin serves no DHCP "
            "(network { dhcp = true }), so it must configure that address itself"
        )
    return text


def _plan_group_network(
    owner: str,
    nic: NicRequest,
    net: BridgeNetwork | None,
    ports: tuple[PortMapping, ...],
    netns: str,
    hostname: str,
) -> NetworkPlan:
    field = f"{NIC_FIELD}.bridge"
    unsupported = (
        ("name", nic.bridge, "the VM is on a bridge of the allocation's own namespace"),
        ("static_ip", nic.static_ip, f"the VM's address comes from {GROUP_SUBNET}"),
        ("gateway", nic.gateway, f"the gateway is {GROUP_SUBNET[1]}"),
        ("netmask", nic.prefixlen, f"the subnet is {GROUP_SUBNET}"),
    )
    for name, value, why in unsupported:
        if value:
            raise ConfigError(f"{field}.{name}", f"cannot be set in {GROUP_MODE}: {why}")
    if nic.vlan is not None:
        raise ConfigError(f"{NIC_FIELD}.vlan", f"cannot be set in {GROUP_MODE}")
    group = group_network(net)
    forwards = []
    for label, port in _ports(nic, ports):
        # Nomad's CNI portmap already forwards host_ip:value to <namespace address>:to (to
        # unset: value); from there the VM takes it on the same port.
        inside = port.to or port.value
        forwards.append((label, PortForward(inside, inside, "tcp", None)))
    return _plan(owner, group, nic, forwards, netns, hostname)


def _plan(
    owner: str,
    net: BridgeNetwork,
    nic: NicRequest,
    forwards: list[tuple[str, PortForward]],
    netns: str = "",
    hostname: str = "",
) -> NetworkPlan:
    """The TAP's name and the guest's MAC derive from the task id, so recovery finds them."""
    return NetworkPlan(
        owner=owner,
        net=net,
        nic=nic,
        tap=tap_name(net.tap_prefix, owner),
        guest_mac=mac_address(owner),
        forwards=tuple(forwards),
        netns=netns,
        hostname=hostname,
    )


def _ports(nic: NicRequest, ports: tuple[PortMapping, ...]) -> list[tuple[str, PortMapping]]:
    """The group ports the NIC names, in its order; a ConfigError for an unknown label."""
    by_label = {p.label: p for p in ports}
    found = []
    for i, label in enumerate(nic.ports):
        port = by_label.get(label)
        if port is None:
            known = ", ".join(sorted(by_label)) or "none"
            raise ConfigError(
                f"{PORTS_FIELD}[{i}]",
                f"no port labelled {label!r} in the group's network block (ports: {known})",
            )
        found.append((label, port))
    return found


def _is_ipv4(text: str) -> bool:
    try:
        IPv4Address(text)
    except ValueError:
        return False
    return True

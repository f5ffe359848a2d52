"""What the plugin's nftables rules say, as nft's JSON expressions: a task's port forwards and
what its guest may send. Pure functions; nomad_vm.network.nft applies them.

What a guest may send (``set_guest_guard``): frames entering the bridge from a guest's TAP
must carry the guest's own MAC, and its own IPv4 address in IPv4 packets and in ARP (0.0.0.0
too where it means "no address yet": DHCP requests, ARP probes); everything else from the TAP
(IPv6, VLAN tags, other protocols) is dropped. Without this a guest could take a neighbour's
address (ARP replies claiming it, or simply sending from it) and receive its traffic or
impersonate it, to the host and to the other guests. The bridge's prerouting hook sees frames
before the bridge learns their source MAC or forwards them, whether they go to another guest or
to the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from nomad_vm.errors import ConfigError

LOOPBACK = IPv4Network("127.0.0.0/8")
NO_ADDRESS = "0.0.0.0"
PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class PortForward:
    """Forward ``host_port`` on this host (``host_ip``, or all its addresses) to the guest."""

    host_port: int
    guest_port: int
    protocol: str = "tcp"
    host_ip: IPv4Address | None = None

    def validate(self, field: str) -> None:
        for name, port in (("host_port", self.host_port), ("guest_port", self.guest_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"{field}.{name}", f"{port!r} is not a port: use 1 to 65535")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{field}.protocol", f"{self.protocol!r}: use 'tcp' or 'udp'")
        if self.host_ip is not None and not isinstance(self.host_ip, IPv4Address):
            raise ConfigError(f"{field}.host_ip", f"{self.host_ip!r} is not an IPv4 address")


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def field(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def prefix(network: IPv4Network) -> dict[str, Any]:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _forward_expr(forward: PortForward, guest_ip: IPv4Address) -> list[Any]:
    if forward.host_ip is None or forward.host_ip.is_unspecified:
        daddr = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    else:
        daddr = match(field("ip", "daddr"), str(forward.host_ip))
    return [
        daddr,
        match(field(forward.protocol, "dport"), forward.host_port),
        {"dnat": {"addr": str(guest_ip), "port": forward.guest_port}},
    ]


def forward_rules(
    guest_ip: IPv4Address, forwards: Iterable[PortForward]
) -> list[tuple[str, list[Any]]]:
    """(chain, expression) of the DNAT and localhost masquerade rules for ``forwards``,
    validated (ConfigError naming ``port_forwards[i]``)."""
    forwards = list(forwards)
    seen: set[tuple[str, IPv4Address | None, int]] = set()
    for i, forward in enumerate(forwards):
        field = f"port_forwards[{i}]"
        forward.validate(field)
        key = (forward.protocol, forward.host_ip, forward.host_port)
        if key in seen:
            raise ConfigError(
                f"{field}.host_port",
                f"{forward.protocol} port {forward.host_port} is forwarded twice",
            )
        seen.add(key)
    new: list[tuple[str, list[Any]]] = []
    for forward in forwards:
        dnat = _forward_expr(forward, guest_ip)
        new.append(("prerouting", dnat))
        new.append(("output", dnat))
    for protocol, guest_port in sorted({(f.protocol, f.guest_port) for f in forwards}):
        new.append(("postrouting", _localhost_masquerade_expr(protocol, guest_ip, guest_port)))
    return new


def guest_guard_exprs(tap: str, guest_mac: str, guest_ip: IPv4Address) -> list[list[Any]]:
    """The bridge-family rules for frames from ``tap``: own MAC, own address, IPv4 and ARP only
    (in this order; the first that matches decides)."""
    iif = match({"meta": {"key": "iifname"}}, tap)
    ether_type = field("ether", "type")
    mac = guest_mac.lower()
    own_or_none = {"set": [str(guest_ip), NO_ADDRESS]}
    return [
        [iif, match(field("ether", "saddr"), mac, op="!="), {"drop": None}],
        [iif, match(ether_type, {"set": ["ip", "arp"]}, op="!="), {"drop": None}],
        # ARP: Ethernet and IPv4 addresses only (the kernel ignores other lengths anyway), and
        # the sender is the guest.
        [iif, match(ether_type, "arp"), match(field("arp", "hlen"), 6, op="!="), {"drop": None}],
        [iif, match(ether_type, "arp"), match(field("arp", "plen"), 4, op="!="), {"drop": None}],
        [
            iif,
            match(ether_type, "arp"),
            match(field("arp", "saddr ether"), mac, op="!="),
            {"drop": None},
        ],
        [
            iif,
            match(ether_type, "arp"),
            match(field("arp", "saddr ip"), own_or_none, op="!="),
            {"drop": None},
        ],
        # A DHCP client asks before it has an address.
        [
            iif,
            match(ether_type, "ip"),
            match(field("ip", "saddr"), NO_ADDRESS),
            match(field("udp", "sport"), 68),
            match(field("udp", "dport"), 67),
            {"accept": None},
        ],
        [
            iif,
            match(ether_type, "ip"),
            match(field("ip", "saddr"), str(guest_ip), op="!="),
            {"drop": None},
        ],
    ]


def _localhost_masquerade_expr(protocol: str, guest_ip: IPv4Address, guest_port: int) -> list[Any]:
    return [
        match(field("ip", "saddr"), prefix(LOOPBACK)),
        match(field("ip", "daddr"), str(guest_ip)),
        match(field(protocol, "dport"), guest_port),
        {"masquerade": None},
    ]

"""Bridges and links over netlink (pyroute2), optionally inside a named network namespace; the
TAP devices on them are in ``taps``.

Every call opens its own netlink socket in a fresh thread (``netns.run_in``): in the plugin's
namespace, or in ``netns`` when given, which is how the tests keep everything out of the host's
namespace (and how a VM gets its TAP inside a Nomad allocation's group network namespace).

Netlink failures become ``NetworkError`` naming the device and the operation; values from the
user's configuration that cannot work become ``ConfigError`` naming the field.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network.names import IFNAME_MAX, bridge_mac
from nomad_vm.network.netns import run_in

IFF_UP = 0x1
_IFNAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class BridgeState:
    """What the kernel says about a bridge; ``exists`` False means nothing else is meaningful.

    ``is_bridge`` is False when an interface of that name exists but is another kind of device.
    """

    name: str
    exists: bool
    is_bridge: bool = False
    up: bool = False
    addresses: tuple[IPv4Interface, ...] = ()
    mac: str | None = None
    vlan_filtering: bool = False


def netlink_call(netns: str | None, what: str, fn: Callable[[Any], _T]) -> _T:
    """``fn(ipr)`` in ``netns``; netlink errors become ``NetworkError`` saying ``what`` failed."""

    def do() -> _T:
        try:
            with IPRoute() as ipr:
                return fn(ipr)
        except NetlinkError as exc:
            where = f" in network namespace {netns}" if netns else ""
            raise NetworkError(f"{what}{where}: {exc.args[-1]} (errno {exc.code})") from exc

    return run_in(netns, do)


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def get_link(ipr: Any, index: int) -> Any:
    return ipr.get_links(index)[0]


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def check_ifname(name: str, field: str | None = None) -> None:
    if _IFNAME.match(name):
        return
    reason = (
        f"{name!r} is not a usable interface name: 1 to {IFNAME_MAX} letters, digits, '-' and '_'"
    )
    if field is not None:
        raise ConfigError(field, reason)
    raise ValueError(reason)


def read_bridge_state(ipr: Any, name: str) -> BridgeState:
    index = link_index(ipr, name)
    if index is None:
        return BridgeState(name=name, exists=False)
    link = get_link(ipr, index)
    is_bridge = _kind(link) == "bridge"
    addresses = tuple(
        IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
        for addr in ipr.get_addr(index=index, family=socket.AF_INET)
    )
    filtering = (
        link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_BR_VLAN_FILTERING")
        if is_bridge
        else None
    )
    return BridgeState(
        name=name,
        exists=True,
        is_bridge=is_bridge,
        up=bool(link["flags"] & IFF_UP),
        addresses=addresses,
        mac=link.get_attr("IFLA_ADDRESS"),
        vlan_filtering=bool(filtering),
    )


def bridge_state(name: str, *, netns: str | None = None) -> BridgeState:
    return netlink_call(
        netns, f"cannot query interface {name}", lambda ipr: read_bridge_state(ipr, name)
    )


def link_exists(name: str, *, netns: str | None = None) -> bool:
    return netlink_call(
        netns, f"cannot look up {name}", lambda ipr: link_index(ipr, name) is not None
    )


def ensure_bridge(
    name: str,
    gateway_cidr: str | None,
    vlan_filtering: bool = False,
    *,
    netns: str | None = None,
) -> BridgeState:
    """Create the bridge if missing, give it ``gateway_cidr`` (e.g. ``10.99.0.1/24``), bring it up.

    Idempotent, and safe on a bridge the operator made: it only adds what is missing and never
    removes addresses or settings. A bridge we create gets a fixed MAC (``names.bridge_mac``),
    so the guests' gateway MAC does not change as TAPs come and go. ``vlan_filtering`` turns
    filtering on (never off: other ports may depend on it).
    """
    check_ifname(name, "network.bridge")
    gateway = _parse_gateway(gateway_cidr) if gateway_cidr is not None else None

    def apply(ipr: Any) -> BridgeState:
        index = link_index(ipr, name)
        if index is None:
            options: dict[str, Any] = {}
            if vlan_filtering:
                options["IFLA_BR_VLAN_FILTERING"] = 1
            try:
                ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(name), **options)
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP and vlan_filtering:
                    raise _no_vlan_filtering(name) from exc
                # Another plugin process created it in the meantime: go on with that one.
                if exc.code != errno.EEXIST:
                    raise
            index = link_index(ipr, name)
            if index is None:
                raise NetworkError(f"bridge {name} vanished right after it was created")
        state = read_bridge_state(ipr, name)
        if not state.is_bridge:
            kind = _kind(get_link(ipr, index)) or "non-bridge"
            raise ConfigError(
                "network.bridge",
                f"an interface named {name} exists and is a {kind} device, not a bridge: "
                "name another bridge, or delete that interface",
            )
        if vlan_filtering and not state.vlan_filtering:
            try:
                ipr.link("set", index=index, kind="bridge", IFLA_BR_VLAN_FILTERING=1)
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP:
                    raise _no_vlan_filtering(name) from exc
                raise
        if gateway is not None and gateway not in state.addresses:
            try:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(gateway.ip),
                    prefixlen=gateway.network.prefixlen,
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        if not state.up:
            ipr.link("set", index=index, state="up")
        return read_bridge_state(ipr, name)

    return netlink_call(netns, f"cannot set up bridge {name}", apply)


def _parse_gateway(value: str) -> IPv4Interface:
    try:
        gateway = IPv4Interface(value)
    except ValueError as exc:
        raise ConfigError(
            "network.gateway",
            f"{value!r} is not an IPv4 address with prefix length, e.g. 10.99.0.1/24",
        ) from exc
    network = gateway.network
    if network.prefixlen > 30 or gateway.ip in (network.network_address, network.broadcast_address):
        raise ConfigError(
            "network.gateway",
            f"{value} is not a host address in a network with room for guests; "
            "give the bridge's own address, e.g. 10.99.0.1/24",
        )
    return gateway


def _no_vlan_filtering(bridge: str) -> NetworkError:
    return NetworkError(
        f"cannot turn on VLAN filtering on bridge {bridge}: this kernel has no bridge VLAN "
        "filtering (CONFIG_BRIDGE_VLAN_FILTERING, which needs CONFIG_VLAN_8021Q); use a kernel "
        "with it, or drop the VLAN setting"
    )


def delete_link(name: str, *, netns: str | None = None) -> bool:
    """Delete interface ``name``; False if there was none (idempotent)."""

    def apply(ipr: Any) -> bool:
        index = link_index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            # Deleted by someone else between the lookup and now.
            if exc.code == errno.ENODEV:
                return False
            raise
        return True

    return netlink_call(netns, f"cannot delete {name}", apply)


def bridge_ports(bridge: str, *, netns: str | None = None) -> list[str]:
    """The names of ``bridge``'s ports, sorted."""

    def query(ipr: Any) -> list[str]:
        index = link_index(ipr, bridge)
        if index is None:
            raise NetworkError(f"there is no bridge named {bridge}")
        return sorted(
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if link.get_attr("IFLA_MASTER") == index
        )

    return netlink_call(netns, f"cannot list the ports of {bridge}", query)

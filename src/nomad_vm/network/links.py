"""Bridges and TAP devices over netlink (pyroute2), optionally inside a named network namespace.

Every call opens its own netlink socket in a fresh thread (``netns.run_in``): in the plugin's
namespace, or in ``netns`` when given, which is how the tests keep everything out of the host's
namespace (and how a VM gets its TAP inside a Nomad allocation's group network namespace).

Netlink failures become ``NetworkError`` naming the device and the operation; values from the
user's configuration that cannot work become ``ConfigError`` naming the field.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
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
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
VLAN_FIELD = "config.network_interface.vlan"
_IFNAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
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


@dataclass(frozen=True)
class PortVlan:
    """One VLAN of a bridge port (``bridge vlan show``)."""

    vid: int
    pvid: bool
    untagged: bool


def _netlink(netns: str | None, what: str, fn: Callable[[Any], _T]) -> _T:
    """``fn(ipr)`` in ``netns``; netlink errors become ``NetworkError`` saying ``what`` failed."""

    def do() -> _T:
        try:
            with IPRoute() as ipr:
                return fn(ipr)
        except NetlinkError as exc:
            where = f" in network namespace {netns}" if netns else ""
            raise NetworkError(f"{what}{where}: {exc.args[-1]} (errno {exc.code})") from exc

    return run_in(netns, do)


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _link(ipr: Any, index: int) -> Any:
    return ipr.get_links(index)[0]


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def _check_ifname(name: str, field: str | None = None) -> None:
    if _IFNAME.match(name):
        return
    reason = (
        f"{name!r} is not a usable interface name: 1 to {IFNAME_MAX} letters, digits, '-' and '_'"
    )
    if field is not None:
        raise ConfigError(field, reason)
    raise ValueError(reason)


def _state(ipr: Any, name: str) -> BridgeState:
    index = _index(ipr, name)
    if index is None:
        return BridgeState(name=name, exists=False)
    link = _link(ipr, index)
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
    return _netlink(netns, f"cannot query interface {name}", lambda ipr: _state(ipr, name))


def link_exists(name: str, *, netns: str | None = None) -> bool:
    return _netlink(netns, f"cannot look up {name}", lambda ipr: _index(ipr, name) is not None)


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
    _check_ifname(name, "network.bridge")
    gateway = _parse_gateway(gateway_cidr) if gateway_cidr is not None else None

    def apply(ipr: Any) -> BridgeState:
        index = _index(ipr, name)
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
            index = _index(ipr, name)
            if index is None:
                raise NetworkError(f"bridge {name} vanished right after it was created")
        state = _state(ipr, name)
        if not state.is_bridge:
            kind = _kind(_link(ipr, index)) or "non-bridge"
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
        return _state(ipr, name)

    return _netlink(netns, f"cannot set up bridge {name}", apply)


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


def create_tap(
    name: str,
    bridge: str,
    mac: str | None = None,
    vlan: int | None = None,
    owner_uid: int = 0,
    *,
    hairpin: bool = True,
    netns: str | None = None,
) -> None:
    """A persistent TAP device ``name``, a port of ``bridge`` (with ``vlan`` as its only VLAN), up.

    Made the way QEMU's ``-netdev tap,ifname=NAME,script=no,downscript=no`` opens it: a TAP
    without packet information and with virtio-net headers (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR),
    persistent so that it outlives our file descriptor, owned by ``owner_uid`` so a QEMU
    running as that user may attach. (A multi-queue guest NIC would also need IFF_MULTI_QUEUE
    here: the flag cannot change once the device exists.)

    ``mac`` is the host end's MAC, never the guest's (see ``names.tap_mac``); None lets the
    kernel choose. ``hairpin``: see ``attach_to_bridge``. ``vlan`` makes the port untagged in
    that VLAN with it as PVID, and removes the bridge's default VLAN from the port, so the guest
    sees only its own VLAN; the bridge must filter VLANs (``ensure_bridge(vlan_filtering=True)``).

    Fails if an interface named ``name`` exists: TAP names come from task ids, so that is a
    leftover of this task to ``delete_link`` first, or a clash. Nothing is left behind when a
    later step fails.
    """
    _check_ifname(name)
    if mac is not None:
        mac = mac.lower()
        if not _MAC.match(mac) or int(mac[:2], 16) & 0x01:
            raise ValueError(f"{mac!r} is not a unicast MAC address")
    if vlan is not None and not 1 <= vlan <= 4094:
        raise ConfigError(VLAN_FIELD, f"{vlan} is not a VLAN id: use 1 to 4094")

    def apply(ipr: Any) -> None:
        bridge_index = _index(ipr, bridge)
        state = _state(ipr, bridge)
        if bridge_index is None or not state.is_bridge:
            raise ConfigError("network.bridge", f"there is no bridge named {bridge}")
        if vlan is not None and not state.vlan_filtering:
            raise ConfigError(
                VLAN_FIELD,
                f"bridge {bridge} does not filter VLANs, so VLAN {vlan} would not isolate "
                "anything: turn VLAN filtering on for it, or drop the VLAN setting",
            )
        if _index(ipr, name) is not None:
            raise NetworkError(
                f"an interface named {name} already exists: delete it first if it is a "
                "leftover of this task, otherwise the TAP name clashes"
            )
        ipr.link(
            "add",
            ifname=name,
            kind="tuntap",
            mode="tap",
            uid=owner_uid,
            ifr={"no_pi": 1, "vnet_hdr": 1},
        )
        index = _index(ipr, name)
        if index is None:
            raise NetworkError(f"TAP {name} vanished right after it was created")
        try:
            if mac is not None:
                ipr.link("set", index=index, address=mac)
            _enslave(ipr, index, bridge_index, hairpin)
            if vlan is not None:
                _set_port_vlan(ipr, index, bridge_index, vlan)
            ipr.link("set", index=index, state="up")
        except BaseException:
            # Best effort: the original error is the one worth reporting.
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
            raise

    _netlink(netns, f"cannot create TAP {name} on bridge {bridge}", apply)


def attach_to_bridge(
    name: str, bridge: str, *, hairpin: bool = True, netns: str | None = None
) -> None:
    """Make interface ``name`` a port of ``bridge`` and bring it up (what ``create_tap`` does).

    ``hairpin`` lets the bridge send a frame back out of the port it came from. Port forwards
    need it when br_netfilter is active (``net.bridge.bridge-nf-call-iptables=1``, the default
    once the module is loaded, as Docker and Kubernetes do): a guest connecting to a port the
    host forwards to a guest on the same bridge (itself, say) has its packet DNATed while it is
    still being *bridged*, and the bridge then has to hand it back out of the guest's own port,
    which it refuses without hairpin mode; the connection just times out. Nomad's own bridge
    networking sets ``hairpinMode`` on its CNI bridge for the same reason, at the same cost:
    the guest also receives copies of its own broadcasts and multicasts (Linux's IPv6 duplicate
    address detection tells its own probes apart since 4.9, by their nonce).
    """
    _check_ifname(name)

    def apply(ipr: Any) -> None:
        index = _index(ipr, name)
        bridge_index = _index(ipr, bridge)
        if index is None:
            raise NetworkError(f"there is no interface named {name}")
        if bridge_index is None or not _state(ipr, bridge).is_bridge:
            raise ConfigError("network.bridge", f"there is no bridge named {bridge}")
        _enslave(ipr, index, bridge_index, hairpin)
        ipr.link("set", index=index, state="up")

    _netlink(netns, f"cannot attach {name} to bridge {bridge}", apply)


def _enslave(ipr: Any, index: int, bridge_index: int, hairpin: bool) -> None:
    ipr.link("set", index=index, master=bridge_index)
    ipr.link("set", index=index, kind="bridge_slave", IFLA_BRPORT_MODE=1 if hairpin else 0)


def _set_port_vlan(ipr: Any, index: int, bridge_index: int, vlan: int) -> None:
    ipr.vlan_filter("add", index=index, vlan_info={"vid": vlan, "pvid": True})
    # A new port joins the bridge's default VLAN (IFLA_BR_VLAN_DEFAULT_PVID, usually 1); left
    # there, the guest would also see that VLAN's untagged traffic.
    default = _link(ipr, bridge_index).get_nested(
        "IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_BR_VLAN_DEFAULT_PVID"
    )
    if default and default != vlan:
        try:
            ipr.vlan_filter("del", index=index, vlan_info={"vid": default})
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise


def port_vlans(port: str, *, netns: str | None = None) -> list[PortVlan]:
    """The VLANs of bridge port ``port``, by VLAN id (empty without VLAN filtering)."""

    def query(ipr: Any) -> list[PortVlan]:
        index = _index(ipr, port)
        if index is None:
            raise NetworkError(f"there is no interface named {port}")
        found: list[PortVlan] = []
        for msg in ipr.get_vlans():
            if msg["index"] != index:
                continue
            spec = msg.get_attr("IFLA_AF_SPEC")
            for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO") if spec else ():
                flags = int(info["flags"])
                found.append(
                    PortVlan(
                        vid=int(info["vid"]),
                        pvid=bool(flags & BRIDGE_VLAN_INFO_PVID),
                        untagged=bool(flags & BRIDGE_VLAN_INFO_UNTAGGED),
                    )
                )
        return sorted(found, key=lambda v: v.vid)

    return _netlink(netns, f"cannot list the VLANs of {port}", query)


def delete_link(name: str, *, netns: str | None = None) -> bool:
    """Delete interface ``name``; False if there was none (idempotent)."""

    def apply(ipr: Any) -> bool:
        index = _index(ipr, name)
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

    return _netlink(netns, f"cannot delete {name}", apply)


def bridge_ports(bridge: str, *, netns: str | None = None) -> list[str]:
    """The names of ``bridge``'s ports, sorted."""

    def query(ipr: Any) -> list[str]:
        index = _index(ipr, bridge)
        if index is None:
            raise NetworkError(f"there is no bridge named {bridge}")
        return sorted(
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if link.get_attr("IFLA_MASTER") == index
        )

    return _netlink(netns, f"cannot list the ports of {bridge}", query)


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def open_tap(name: str, *, netns: str | None = None) -> int:
    """A file descriptor attached to the existing TAP ``name`` (``create_tap``), opened inside
    ``netns``, for QEMU's ``-netdev tap,fd=N``.

    A TAP is found by name in the network namespace of whoever opens ``/dev/net/tun``, so a QEMU
    running in the plugin's namespace cannot open by name a TAP that lives in another one (an
    allocation's group namespace); this descriptor, opened by a thread that entered it, can be
    handed over instead. The flags match ``create_tap``'s. The caller closes it (close-on-exec:
    pass it explicitly, e.g. ``subprocess.Popen(pass_fds=...)``).
    """
    _check_ifname(name)

    def do() -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"cannot open /dev/net/tun for TAP {name}: {exc}") from exc
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            where = f" in network namespace {netns}" if netns else ""
            raise NetworkError(f"cannot attach to TAP {name}{where}: {exc}") from exc
        return fd

    return run_in(netns, do)

"""TAP devices for VMs: created as ports of a bridge (hairpin, optional VLAN), listed, and
opened as file descriptors for QEMU, over netlink (pyroute2) and optionally inside a named
network namespace (``links.netlink_call``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network.links import (
    check_ifname,
    get_link,
    link_index,
    netlink_call,
    read_bridge_state,
)
from nomad_vm.network.netns import run_in

BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
VLAN_FIELD = "config.network_interface.vlan"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class PortVlan:
    """One VLAN of a bridge port (``bridge vlan show``)."""

    vid: int
    pvid: bool
    untagged: bool


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
    check_ifname(name)
    if mac is not None:
        mac = mac.lower()
        if not _MAC.match(mac) or int(mac[:2], 16) & 0x01:
            raise ValueError(f"{mac!r} is not a unicast MAC address")
    if vlan is not None and not 1 <= vlan <= 4094:
        raise ConfigError(VLAN_FIELD, f"{vlan} is not a VLAN id: use 1 to 4094")

    def apply(ipr: Any) -> None:
        bridge_index = link_index(ipr, bridge)
        state = read_bridge_state(ipr, bridge)
        if bridge_index is None or not state.is_bridge:
            raise ConfigError("network.bridge", f"there is no bridge named {bridge}")
        if vlan is not None and not state.vlan_filtering:
            raise ConfigError(
                VLAN_FIELD,
                f"bridge {bridge} does not filter VLANs, so VLAN {vlan} would not isolate "
                "anything: turn VLAN filtering on for it, or drop the VLAN setting",
            )
        if link_index(ipr, name) is not None:
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
        index = link_index(ipr, name)
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

    netlink_call(netns, f"cannot create TAP {name} on bridge {bridge}", apply)


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
    check_ifname(name)

    def apply(ipr: Any) -> None:
        index = link_index(ipr, name)
        bridge_index = link_index(ipr, bridge)
        if index is None:
            raise NetworkError(f"there is no interface named {name}")
        if bridge_index is None or not read_bridge_state(ipr, bridge).is_bridge:
            raise ConfigError("network.bridge", f"there is no bridge named {bridge}")
        _enslave(ipr, index, bridge_index, hairpin)
        ipr.link("set", index=index, state="up")

    netlink_call(netns, f"cannot attach {name} to bridge {bridge}", apply)


def _enslave(ipr: Any, index: int, bridge_index: int, hairpin: bool) -> None:
    ipr.link("set", index=index, master=bridge_index)
    ipr.link("set", index=index, kind="bridge_slave", IFLA_BRPORT_MODE=1 if hairpin else 0)


def _set_port_vlan(ipr: Any, index: int, bridge_index: int, vlan: int) -> None:
    ipr.vlan_filter("add", index=index, vlan_info={"vid": vlan, "pvid": True})
    # A new port joins the bridge's default VLAN (IFLA_BR_VLAN_DEFAULT_PVID, usually 1); left
    # there, the guest would also see that VLAN's untagged traffic.
    default = get_link(ipr, bridge_index).get_nested(
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
        index = link_index(ipr, port)
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

    return netlink_call(netns, f"cannot list the VLANs of {port}", query)


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
    check_ifname(name)

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

"""A VM's macvtap link: a TAP-like device stacked on a host interface (the lower device), so the
guest sits directly on that interface's network, with no bridge of ours in between. Created
and checked over netlink (pyroute2), optionally inside a named network namespace, and opened as
the character device ``/dev/tap<ifindex>`` for QEMU's ``-netdev tap,fd=N``.

The link lives in the namespace of its lower device, and the kernel delivers to it only frames
for its own MAC (bridge, vepa, private), or everything the lower device receives (passthrough,
which takes the device for itself: one macvtap per device, no other macvlan beside it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network.links import check_ifname, get_link, link_index, netlink_call
from nomad_vm.network.names import check_device_name
from nomad_vm.network.netns import run_in

# The virt seed's names; the kernel calls passthrough "passthru".
MODES = ("bridge", "private", "vepa", "passthrough")
_KERNEL_MODE = {"bridge": "bridge", "private": "private", "vepa": "vepa", "passthrough": "passthru"}
_STACKED = ("macvlan", "macvtap")
IFF_LOOPBACK = 0x8
TUNGETIFF = 0x800454D2


@dataclass(frozen=True)
class MacvtapFields:
    """The config fields a lower-device problem is reported under."""

    device: str
    mode: str


def create_macvtap(
    name: str,
    device: str,
    mode: str,
    mac: str | None,
    fields: MacvtapFields,
    *,
    netns: str | None = None,
) -> str:
    """A macvtap ``name`` on ``device`` in ``mode``, up; returns its MAC (the guest's).

    ``mac`` is the guest's MAC; passthrough ignores it and keeps the device's own (the link
    takes the device's MAC, and changing it there would change the device's, which then would
    have to be put back). Problems of the device or mode a job named are ``ConfigError`` under
    ``fields``; nothing is left behind when a step fails.
    """
    check_ifname(name)
    check_device_name(device, fields.device)
    if mode not in MODES:
        raise ConfigError(fields.mode, f"{mode!r} is not a macvtap mode: use one of {MODES}")

    def apply(ipr: Any) -> str:
        lower = _lower_device(ipr, device, mode, fields)
        if link_index(ipr, name) is not None:
            raise NetworkError(
                f"an interface named {name} already exists: delete it first if it is a "
                "leftover of this task, otherwise the name clashes"
            )
        extra = {"address": mac} if mac is not None and mode != "passthrough" else {}
        try:
            ipr.link(
                "add",
                ifname=name,
                kind="macvtap",
                link=lower,
                macvtap_mode=_KERNEL_MODE[mode],
                **extra,
            )
        except NetlinkError as exc:
            if exc.code in (errno.EBUSY, errno.EINVAL, errno.EOPNOTSUPP):
                raise ConfigError(
                    fields.device,
                    f"the kernel refused a {mode} macvtap on {device}: {exc.args[-1]} "
                    f"(errno {exc.code}); a device that is a bridge port or already serves "
                    "another passthrough macvtap cannot take one",
                ) from None
            raise
        index = link_index(ipr, name)
        if index is None:
            raise NetworkError(f"macvtap {name} vanished right after it was created")
        try:
            ipr.link("set", index=index, state="up")
            return str(get_link(ipr, index).get_attr("IFLA_ADDRESS"))
        except BaseException:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
            raise

    return netlink_call(netns, f"cannot create macvtap {name} on {device}", apply)


def check_lower_device(
    device: str, mode: str, fields: MacvtapFields, *, netns: str | None = None
) -> None:
    """What ``create_macvtap`` checks of the device first, without creating anything."""
    check_device_name(device, fields.device)
    netlink_call(
        netns,
        f"cannot look up {device}",
        lambda ipr: _lower_device(ipr, device, mode, fields),
    )


def _lower_device(ipr: Any, device: str, mode: str, fields: MacvtapFields) -> int:
    """The index of ``device`` if a ``mode`` macvtap can go on it; else a ConfigError."""
    index = link_index(ipr, device)
    if index is None:
        raise ConfigError(
            fields.device,
            f"there is no network interface {device!r} on this host: name an existing one "
            "(ip link show)",
        )
    link = get_link(ipr, index)
    if link["flags"] & IFF_LOOPBACK:
        raise ConfigError(fields.device, f"{device} is a loopback device: name a network card")
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind == "macvtap":
        raise ConfigError(fields.device, f"{device} is itself a macvtap: name the device below it")
    _refuse_busy(ipr, index, device, mode, fields)
    return index


def _refuse_busy(ipr: Any, index: int, device: str, mode: str, fields: MacvtapFields) -> None:
    """Passthrough needs the device to itself (nothing stacked on it, no address of the
    host's on it); a device held in passthrough takes nothing else."""
    stacked = [(str(lnk.get_attr("IFLA_IFNAME")), _mode(lnk)) for lnk in _uppers(ipr, index)]
    if mode == "passthrough":
        if stacked:
            names = ", ".join(name for name, _ in stacked)
            raise ConfigError(
                fields.mode,
                f"passthrough takes {device} for this VM alone, but it is in use by {names}: "
                "choose a free device, or mode bridge, vepa or private to share it",
            )
        addresses = [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index)]
        addresses = [a for a in addresses if not a.startswith("fe80:")]
        if addresses:
            raise ConfigError(
                fields.mode,
                f"passthrough would take {device} from this host, which uses it "
                f"({', '.join(addresses)}): every frame it receives would go to the VM; pass "
                "through a device the host does not use, or use mode bridge",
            )
    passthrough = [name for name, m in stacked if m == "passthru"]
    if passthrough:
        raise ConfigError(
            fields.device,
            f"{device} is in use: {passthrough[0]} holds it in passthrough mode, which leaves "
            "room for no other macvtap",
        )


def _uppers(ipr: Any, index: int) -> list[Any]:
    """The macvlan and macvtap links stacked on interface ``index``."""
    return [
        link
        for link in ipr.get_links()
        if link.get_attr("IFLA_LINK") == index
        and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") in _STACKED
        and link["index"] != index
    ]


def _mode(link: Any) -> str:
    data = ("IFLA_LINKINFO", "IFLA_INFO_DATA")
    mode = link.get_nested(*data, "IFLA_MACVTAP_MODE") or link.get_nested(
        *data, "IFLA_MACVLAN_MODE"
    )
    return str(mode or "")


def macvtap_lower(name: str, *, netns: str | None = None) -> str | None:
    """The lower device of macvtap ``name``; None when there is no such macvtap."""

    def query(ipr: Any) -> str | None:
        index = link_index(ipr, name)
        if index is None:
            return None
        link = get_link(ipr, index)
        if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "macvtap":
            return None
        lower = link.get_attr("IFLA_LINK")
        return str(get_link(ipr, lower).get_attr("IFLA_IFNAME")) if lower else None

    return netlink_call(netns, f"cannot look up {name}", query)


def open_macvtap(name: str, *, netns: str | None = None) -> int:
    """A descriptor of macvtap ``name``'s character device, for QEMU's ``-netdev tap,fd=N``.

    The device node is ``/dev/tap<ifindex>``; ifindexes are per namespace while /dev is not, so
    the node of that number may belong to a link of another namespace. The descriptor is
    therefore asked which link it reaches (TUNGETIFF) and refused unless it is ``name``.
    Close-on-exec: pass it explicitly; the caller closes it.
    """
    check_ifname(name)

    def do() -> int:
        index = netlink_call(None, f"cannot look up {name}", lambda ipr: link_index(ipr, name))
        if index is None:
            raise NetworkError(f"macvtap {name} does not exist")
        node = f"/dev/tap{index}"
        try:
            fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"cannot open {node} for macvtap {name}: {exc}") from exc
        try:
            reply = fcntl.ioctl(fd, TUNGETIFF, struct.pack("16sH22x", b"", 0))
        except OSError as exc:
            os.close(fd)
            raise NetworkError(f"{node} is not the device of macvtap {name}: {exc}") from exc
        found = reply[:16].rstrip(b"\0").decode(errors="replace")
        if found != name:
            os.close(fd)
            raise NetworkError(
                f"{node} belongs to {found!r}, not macvtap {name} (a link of another network "
                "namespace with the same interface index)"
            )
        return fd

    return run_in(netns, do)

"""Kernel settings under ``/proc/sys``, optionally inside a named network namespace.

Keys are paths relative to ``/proc/sys`` with '/' separators (``net/ipv4/ip_forward``), not
sysctl's dotted form: interface names may contain '.' (``eth0.100``), which the dotted form
would split.

``/proc/sys/net`` is per network namespace and shows the namespace of the thread that opens the
file, so inside a namespace the file is opened by a thread that entered it (``netns.run_in``).
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.errors import NetworkError
from nomad_vm.network.netns import run_in

PROC_SYS = Path("/proc/sys")


def _path(key: str) -> Path:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{key!r} is not a /proc/sys key such as 'net/ipv4/ip_forward'")
    return PROC_SYS.joinpath(*parts)


def read(key: str, *, netns: str | None = None) -> str:
    path = _path(key)

    def do() -> str:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise NetworkError(f"cannot read {path}: {exc}") from exc

    return run_in(netns, do)


def write(key: str, value: str, *, netns: str | None = None) -> None:
    path = _path(key)

    def do() -> None:
        try:
            # Skip the write when the value is already there: fewer changes logged by auditors,
            # and it works on a read-only /proc/sys (a container) as long as nothing changes.
            if path.read_text().strip() == value:
                return
            path.write_text(value + "\n")
        except OSError as exc:
            raise NetworkError(f"cannot set {path} to {value}: {exc}") from exc

    run_in(netns, do)


def enable_ip_forward(*, netns: str | None = None) -> None:
    """``net.ipv4.ip_forward=1``: the host routes packets between the bridge and the outside.

    Port forwards from other machines and NAT for the guests both need it. It is one switch
    for the whole namespace; the plugin never turns it back off, as other software may rely on
    it by then.
    """
    write("net/ipv4/ip_forward", "1", netns=netns)


def enable_route_localnet(interface: str, *, netns: str | None = None) -> None:
    """``net.ipv4.conf.<interface>.route_localnet=1``: see ``nft.PortForwarder.prepare_bridge``."""
    set_route_localnet(interface, True, netns=netns)


def set_route_localnet(interface: str, on: bool, *, netns: str | None = None) -> None:
    """``net.ipv4.conf.<interface>.route_localnet``: on only behind the bridge's guard rules
    (``nft.PortForwarder.prepare_bridge``); off closes the hole when they cannot be had."""
    write(route_localnet_key(interface), "1" if on else "0", netns=netns)


def route_localnet_key(interface: str) -> str:
    if "/" in interface or interface in ("", ".", ".."):
        raise ValueError(f"{interface!r} is not an interface name")
    return f"net/ipv4/conf/{interface}/route_localnet"

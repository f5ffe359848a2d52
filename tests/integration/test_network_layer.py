"""The host networking layer against a real kernel, entirely inside throwaway network namespaces.

Nothing here touches the host's own namespace: every bridge, TAP, veth, address, sysctl and
nftables table lives in namespaces named ``nvt-<random>`` that the ``ns`` fixture creates and
always deletes (tests/netns.py), after which it checks that no link or table of ours appeared
in the host's namespace and that the host's ip_forward is unchanged. Traffic only flows
between those namespaces (10.99.0.0/24 for the bridge, 10.98.0.0/24 for the "other machine").

Port forwarding topology::

    other (10.98.0.2) --veth-- host (10.98.0.1; bridge nvtbr0 10.99.0.1/24) --veth-- guest (.50)

The guest namespace stands in for a VM: it is attached to the bridge through a veth instead of
a TAP, since there is no QEMU here. Clients and servers run under ``ip netns exec``.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network import links, netns, sysctl, taps
from nomad_vm.network.names import bridge_mac, mac_address, rule_tag, tap_mac, tap_name
from nomad_vm.network.nft import DEFAULT_TABLE, PortForwarder
from nomad_vm.network.nft_rules import PortForward
from nomad_vm.network.taps import PortVlan
from tests.netns import Namespaces, ip, isolated_namespaces

pytestmark = pytest.mark.integration

BRIDGE = "nvtbr0"
SUBNET = IPv4Network("10.99.0.0/24")
GUEST_IP = IPv4Address("10.99.0.50")
HOST_OUTSIDE_IP = "10.98.0.1"
OTHER_IP = "10.98.0.2"
TAP_PREFIX = "nvt"
OWNER = "5c1e0b7a-0000-4b7a-9f00-000000000001/web/0f3a9c21"

SERVER = r"""
import socket, sys, threading
def tcp(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, peer = s.accept()
        c.sendall(f"tcp from {peer[0]}\n".encode())
        c.close()
def udp(port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", port))
    while True:
        _, peer = u.recvfrom(100)
        u.sendto(f"udp from {peer[0]}".encode(), peer)
threading.Thread(target=udp, args=(int(sys.argv[2]),), daemon=True).start()
threading.Thread(target=tcp, args=(int(sys.argv[1]),), daemon=True).start()
import time; time.sleep(0.2)
print("ready", flush=True)
sys.stdin.read()
"""

LOCAL_ONLY_SERVER = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"host-local secret\n")
    c.close()
"""

CLIENT = r"""
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=timeout)
        print(s.recv(100).decode().strip())
    else:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(timeout)
        u.sendto(b"ping", (host, port))
        print(u.recv(100).decode().strip())
except OSError as exc:
    print(f"error {type(exc).__name__}")
"""


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[Namespaces]:
    with isolated_namespaces(("nvt", "nvm", "nomad")) as spaces:
        yield spaces


def connect(ns_name: str, host: str, port: int, proto: str = "tcp", timeout: float = 2.0) -> str:
    """What a client in ``ns_name`` receives from ``host:port``, or ``error <exception>``."""
    argv = [sys.executable, "-c", CLIENT, proto, host, str(port), str(timeout)]
    out = subprocess.run(
        ["ip", "netns", "exec", ns_name, *argv],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
        check=True,
    )
    return out.stdout.strip()


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    ip("-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)


# -- links -----------------------------------------------------------------------------------


def test_ensure_bridge_is_idempotent(ns: Namespaces) -> None:
    host = ns.new()
    assert links.bridge_state(BRIDGE, netns=host).exists is False
    first = links.ensure_bridge(BRIDGE, "10.99.0.1/24", netns=host)
    again = links.ensure_bridge(BRIDGE, "10.99.0.1/24", netns=host)
    assert first == again
    assert first.exists and first.is_bridge and first.up
    assert [str(a) for a in first.addresses] == ["10.99.0.1/24"]
    assert first.mac == bridge_mac(BRIDGE)
    # Nothing in the plugin's own namespace.
    assert not links.link_exists(BRIDGE)
    # A second address is added, the first kept.
    both = links.ensure_bridge(BRIDGE, "10.97.0.1/24", netns=host)
    assert sorted(str(a) for a in both.addresses) == ["10.97.0.1/24", "10.99.0.1/24"]
    # Without an address: just there and up.
    assert links.ensure_bridge("nvtbr1", None, netns=host).addresses == ()


def test_ensure_bridge_refuses_a_non_bridge_and_bad_gateways(ns: Namespaces) -> None:
    host = ns.new()
    veth(host, "nvtveth0", host, "nvtveth1")
    with pytest.raises(ConfigError) as err:
        links.ensure_bridge("nvtveth0", None, netns=host)
    assert err.value.field == "network.bridge"
    assert "veth device, not a bridge" in err.value.reason
    for bad in ("10.99.0.1", "10.99.0.0/24", "10.99.0.1/31", "fe80::1/64", "x"):
        with pytest.raises(ConfigError) as err:
            links.ensure_bridge(BRIDGE, bad, netns=host)
        assert err.value.field == "network.gateway", bad
    with pytest.raises(NetworkError, match="does not exist"):
        links.ensure_bridge(BRIDGE, None, netns="nvt-no-such-namespace")


def test_tap_on_the_bridge(ns: Namespaces) -> None:
    host = ns.new()
    links.ensure_bridge(BRIDGE, "10.99.0.1/24", netns=host)
    task = "alloc-1/web/0f3a9c21"
    name = tap_name(TAP_PREFIX, task)
    mac = tap_mac(mac_address(task))
    taps.create_tap(name, BRIDGE, mac=mac, owner_uid=4242, netns=host)

    assert links.link_exists(name, netns=host)
    assert links.bridge_ports(BRIDGE, netns=host) == [name]
    tap = links.bridge_state(name, netns=host)
    assert tap.exists and not tap.is_bridge and tap.up
    assert tap.mac == mac
    # A bridge whose MAC was never set takes the lowest of its ports' MACs, so the guests'
    # gateway MAC would change as TAPs come and go. Ours was set: a lower port MAC changes nothing.
    low = tap_name(TAP_PREFIX, "low-mac-task")
    taps.create_tap(low, BRIDGE, mac="02:00:00:00:00:01", netns=host)
    assert links.bridge_state(BRIDGE, netns=host).mac == bridge_mac(BRIDGE)
    assert links.delete_link(low, netns=host)
    # Flags as QEMU opens it (sysfs, read in the namespace): IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
    # persistent, owned by the given uid.
    flags = int(_sysfs(host, f"/sys/class/net/{name}/tun_flags"), 16)
    assert flags & 0x0002, "not a TAP"
    assert flags & 0x1000, "packet information header on (IFF_NO_PI missing)"
    assert flags & 0x4000, "no virtio-net header (IFF_VNET_HDR missing)"
    assert flags & 0x0800, "not persistent"
    assert _sysfs(host, f"/sys/class/net/{name}/owner") == "4242"
    assert _sysfs(host, f"/sys/class/net/{name}/brport/hairpin_mode") == "1"
    # What QEMU does with ifname=: attach with TUNSETIFF. Works, and the device stays after.
    netns.run_in(host, lambda: _attach_tap(name))
    assert links.link_exists(name, netns=host)

    with pytest.raises(NetworkError, match="already exists"):
        taps.create_tap(name, BRIDGE, netns=host)
    assert links.delete_link(name, netns=host) is True
    assert links.delete_link(name, netns=host) is False
    assert links.bridge_ports(BRIDGE, netns=host) == []


def test_tap_errors_leave_nothing_behind(ns: Namespaces) -> None:
    host = ns.new()
    name = tap_name(TAP_PREFIX, "t")
    with pytest.raises(ConfigError) as err:
        taps.create_tap(name, "nvtnobridge", netns=host)
    assert err.value.field == "network.bridge"
    links.ensure_bridge(BRIDGE, None, netns=host)
    for vlan in (0, 4095):
        with pytest.raises(ConfigError) as err:
            taps.create_tap(name, BRIDGE, vlan=vlan, netns=host)
        assert err.value.field == "config.network_interface.vlan"
    # VLAN on a bridge that does not filter VLANs: refused before anything is created.
    with pytest.raises(ConfigError) as err:
        taps.create_tap(name, BRIDGE, vlan=100, netns=host)
    assert "does not filter VLANs" in err.value.reason
    with pytest.raises(ValueError, match="unicast"):
        taps.create_tap(name, BRIDGE, mac="53:00:00:00:00:01", netns=host)
    assert not links.link_exists(name, netns=host)
    assert links.bridge_ports(BRIDGE, netns=host) == []


def test_vlan_filtering_sets_the_ports_pvid_or_is_refused_clearly(ns: Namespaces) -> None:
    """On this host's kernel (and CI's), which lack bridge VLAN filtering, what is checked is
    the refusal; the VLAN ports themselves are verified on the Debian guest's kernel, which has
    it (test_vlan_in_guest.py), and here too on a host that has it."""
    host = ns.new()
    try:
        state = links.ensure_bridge(BRIDGE, None, vlan_filtering=True, netns=host)
    except NetworkError as exc:
        # Kernels built without CONFIG_BRIDGE_VLAN_FILTERING (it needs CONFIG_VLAN_8021Q):
        # the error must say so, and nothing may be left half made.
        assert "CONFIG_BRIDGE_VLAN_FILTERING" in str(exc)
        assert not links.link_exists(BRIDGE, netns=host)
        return
    assert state.vlan_filtering
    name = tap_name(TAP_PREFIX, "vlan-task")
    taps.create_tap(name, BRIDGE, vlan=100, netns=host)
    assert taps.port_vlans(name, netns=host) == [PortVlan(vid=100, pvid=True, untagged=True)]


def _sysfs(ns_name: str, path: str) -> str:
    # `ip netns exec` mounts the namespace's own /sys; sysfs values are single tokens.
    out = subprocess.run(
        ["ip", "netns", "exec", ns_name, "cat", path], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _attach_tap(name: str) -> None:
    tunsetiff = 0x400454CA
    flags = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), flags))
    finally:
        os.close(fd)


# -- sysctl ----------------------------------------------------------------------------------


def test_sysctl_writes_only_the_namespaces_value(ns: Namespaces) -> None:
    host = ns.new()
    assert sysctl.read("net/ipv4/ip_forward", netns=host) == "0"
    sysctl.enable_ip_forward(netns=host)
    assert sysctl.read("net/ipv4/ip_forward", netns=host) == "1"
    assert _sysfs(host, "/proc/sys/net/ipv4/ip_forward") == "1"
    # (The fixture checks that the host's own value did not change.)
    with pytest.raises(ValueError):
        sysctl.read("../../etc/passwd", netns=host)


# -- nftables --------------------------------------------------------------------------------


@pytest.fixture
def topology(ns: Namespaces) -> dict[str, str]:
    """host, guest and other namespaces wired as in the module docstring, servers running."""
    host, guest, other = ns.new(), ns.new(), ns.new()
    links.ensure_bridge(BRIDGE, "10.99.0.1/24", netns=host)
    veth(host, "nvtvg", guest, "eth0")
    taps.attach_to_bridge("nvtvg", BRIDGE, netns=host)
    ip("-n", guest, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    ip("-n", guest, "link", "set", "eth0", "up")
    ip("-n", guest, "route", "add", "default", "via", "10.99.0.1")
    veth(host, "nvtvo", other, "eth0")
    ip("-n", host, "addr", "add", f"{HOST_OUTSIDE_IP}/24", "dev", "nvtvo")
    ip("-n", host, "link", "set", "nvtvo", "up")
    ip("-n", other, "addr", "add", f"{OTHER_IP}/24", "dev", "eth0")
    ip("-n", other, "link", "set", "eth0", "up")
    sysctl.enable_ip_forward(netns=host)
    ns.spawn(guest, SERVER, "8080", "5353")
    # The guest is reachable directly; nothing is forwarded yet.
    assert connect(host, str(GUEST_IP), 8080) == "tcp from 10.99.0.1"
    assert connect(host, "127.0.0.1", 18080, timeout=1).startswith("error")
    assert connect(other, HOST_OUTSIDE_IP, 18080, timeout=1).startswith("error")
    return {"host": host, "guest": guest, "other": other}


def test_port_forwards_from_localhost_other_machines_and_the_guest(
    topology: dict[str, str],
) -> None:
    host, guest, other = topology["host"], topology["guest"], topology["other"]
    pf = PortForwarder(netns=host)
    pf.ensure_table()
    pf.ensure_table()
    pf.prepare_bridge(BRIDGE, SUBNET)
    forwards = [
        PortForward(host_port=18080, guest_port=8080),
        PortForward(host_port=15353, guest_port=5353, protocol="udp"),
        PortForward(host_port=18081, guest_port=8080, host_ip=IPv4Address(HOST_OUTSIDE_IP)),
    ]
    pf.set_port_forwards(OWNER, GUEST_IP, forwards)
    pf.set_port_forwards(OWNER, GUEST_IP, forwards)  # replaces, does not duplicate
    mine = pf.rules(OWNER)
    assert {r.comment for r in mine} == {rule_tag(OWNER)}
    assert sorted(r.chain for r in mine) == sorted(
        ["prerouting", "output"] * 3 + ["postrouting"] * 2
    )

    # (a) from the host itself to 127.0.0.1: DNAT in output, masqueraded to the bridge address.
    assert connect(host, "127.0.0.1", 18080) == "tcp from 10.99.0.1"
    # ... and to any other local address of the host.
    assert connect(host, HOST_OUTSIDE_IP, 18080) == f"tcp from {HOST_OUTSIDE_IP}"
    # (b) from another machine: DNAT in prerouting; the client's address reaches the guest.
    assert connect(other, HOST_OUTSIDE_IP, 18080) == f"tcp from {OTHER_IP}"
    assert connect(other, HOST_OUTSIDE_IP, 15353, proto="udp") == f"udp from {OTHER_IP}"
    # host_ip: only on that address.
    assert connect(other, HOST_OUTSIDE_IP, 18081) == f"tcp from {OTHER_IP}"
    assert connect(host, "10.99.0.1", 18081, timeout=1).startswith("error")
    # (c) hairpin: the guest through the host's forwarded port back to itself.
    assert connect(guest, HOST_OUTSIDE_IP, 18080) == "tcp from 10.99.0.1"

    assert pf.remove_rules(OWNER) == 8
    assert pf.remove_rules(OWNER) == 0
    assert pf.rules(OWNER) == []
    assert connect(host, "127.0.0.1", 18080, timeout=1).startswith("error")
    assert connect(other, HOST_OUTSIDE_IP, 18080, timeout=1).startswith("error")
    assert connect(other, HOST_OUTSIDE_IP, 15353, proto="udp", timeout=1).startswith("error")
    # The bridge's rules stay until the table goes.
    assert {r.comment for r in pf.rules()} == {f"nomad-vm:bridge:{BRIDGE}"}

    pf.delete_table()
    pf.delete_table()
    assert pf.rules() == []


def test_localhost_forwarding_needs_route_localnet_and_masquerade(
    topology: dict[str, str],
) -> None:
    """Why prepare_bridge exists: the DNAT rules alone do not work for 127.0.0.1."""
    host = topology["host"]
    pf = PortForwarder(netns=host)
    pf.set_port_forwards(OWNER, GUEST_IP, [PortForward(host_port=18080, guest_port=8080)])
    assert connect(host, "127.0.0.1", 18080, timeout=1) == "error TimeoutError"
    assert connect(host, HOST_OUTSIDE_IP, 18080) == f"tcp from {HOST_OUTSIDE_IP}"
    pf.prepare_bridge(BRIDGE, SUBNET)
    assert sysctl.read(f"net/ipv4/conf/{BRIDGE}/route_localnet", netns=host) == "1"
    assert connect(host, "127.0.0.1", 18080) == "tcp from 10.99.0.1"
    # Without the masquerade the guest sees source 127.0.0.1 and answers its own loopback.
    (masquerade,) = [r for r in pf.rules(OWNER) if r.chain == "postrouting"]
    delete = {"family": "ip", "table": DEFAULT_TABLE, "chain": "postrouting"}
    batch = {"nftables": [{"delete": {"rule": {**delete, "handle": masquerade.handle}}}]}
    subprocess.run(
        ["ip", "netns", "exec", host, "nft", "-j", "-f", "-"],
        input=json.dumps(batch),
        text=True,
        check=True,
    )
    assert connect(host, "127.0.0.1", 18080, timeout=1) == "error TimeoutError"
    assert connect(host, HOST_OUTSIDE_IP, 18080) == f"tcp from {HOST_OUTSIDE_IP}"
    pf.delete_table()


def test_guests_cannot_reach_the_hosts_loopback_services(
    ns: Namespaces, topology: dict[str, str]
) -> None:
    """route_localnet on the bridge would expose 127.0.0.1 to guests (CVE-2020-8558)."""
    host, guest = topology["host"], topology["guest"]
    ns.spawn(host, LOCAL_ONLY_SERVER, "9999")
    # A hostile guest: routes 127.0.0.0/8 to the host (and drops its own loopback addresses,
    # or it would discard replies from "its own" address).
    ip("-n", guest, "addr", "flush", "dev", "lo")
    ip("-n", guest, "route", "add", "127.0.0.0/8", "via", "10.99.0.1", "dev", "eth0")
    sysctl.write("net/ipv4/conf/eth0/route_localnet", "1", netns=guest)
    # The hole, with route_localnet alone (this proves the test can see it):
    sysctl.enable_route_localnet(BRIDGE, netns=host)
    assert connect(guest, "127.0.0.1", 9999) == "host-local secret"
    # prepare_bridge closes it, and localhost forwarding keeps working.
    pf = PortForwarder(netns=host)
    pf.prepare_bridge(BRIDGE, SUBNET)
    pf.prepare_bridge(BRIDGE, SUBNET)  # idempotent
    assert len(pf.rules()) == 3
    assert connect(guest, "127.0.0.1", 9999, timeout=1) == "error TimeoutError"
    pf.set_port_forwards(OWNER, GUEST_IP, [PortForward(host_port=18080, guest_port=8080)])
    assert connect(topology["host"], "127.0.0.1", 18080) == "tcp from 10.99.0.1"
    pf.delete_table()


def test_hairpin_under_br_netfilter_needs_the_ports_hairpin_mode(
    topology: dict[str, str],
) -> None:
    """Why attach_to_bridge sets hairpin mode by default."""
    host, guest = topology["host"], topology["guest"]
    pf = PortForwarder(netns=host)
    pf.prepare_bridge(BRIDGE, SUBNET)
    pf.set_port_forwards(OWNER, GUEST_IP, [PortForward(host_port=18080, guest_port=8080)])
    assert connect(guest, HOST_OUTSIDE_IP, 18080) == "tcp from 10.99.0.1"
    taps.attach_to_bridge("nvtvg", BRIDGE, hairpin=False, netns=host)
    if sysctl.read("net/bridge/bridge-nf-call-iptables", netns=host) == "1":
        assert connect(guest, HOST_OUTSIDE_IP, 18080, timeout=1) == "error TimeoutError"
        sysctl.write("net/bridge/bridge-nf-call-iptables", "0", netns=host)
    # Without br_netfilter the packet is routed, not bridged, and hairpin mode does not matter.
    assert connect(guest, HOST_OUTSIDE_IP, 18080) == "tcp from 10.99.0.1"
    pf.delete_table()


def test_nat_and_reconcile(ns: Namespaces, topology: dict[str, str]) -> None:
    host, guest, other = topology["host"], topology["guest"], topology["other"]
    pf = PortForwarder(netns=host)
    pf.ensure_table()
    # Without NAT the other machine sees the guest's own address (and has no route back).
    ns.spawn(other, SERVER, "7000", "7001")
    assert connect(guest, OTHER_IP, 7000, timeout=1).startswith("error")
    pf.enable_nat(SUBNET, BRIDGE)
    pf.enable_nat(SUBNET, BRIDGE)
    assert connect(guest, OTHER_IP, 7000) == f"tcp from {HOST_OUTSIDE_IP}"

    pf.set_port_forwards("task-a", GUEST_IP, [PortForward(18080, 8080)])
    pf.set_port_forwards("task-b", GUEST_IP, [PortForward(18082, 8080)])
    removed = pf.reconcile({"task-a", "task-gone"})
    assert removed == [rule_tag("task-b")]
    assert pf.rules("task-b") == []
    assert len(pf.rules("task-a")) == 3
    assert [r.comment for r in pf.rules() if r.chain == "postrouting" and "nat" in str(r.comment)]
    assert connect(other, HOST_OUTSIDE_IP, 18080) == f"tcp from {OTHER_IP}"
    assert connect(other, HOST_OUTSIDE_IP, 18082, timeout=1).startswith("error")
    pf.disable_nat(BRIDGE)
    assert not [r for r in pf.rules() if r.comment == f"nomad-vm:nat:{BRIDGE}"]
    pf.delete_table()


def test_port_forward_validation() -> None:
    pf = PortForwarder(netns="nvt-never-used")
    cases: list[tuple[list[PortForward], str]] = [
        ([PortForward(0, 80)], "port_forwards[0].host_port"),
        ([PortForward(80, 65536)], "port_forwards[0].guest_port"),
        ([PortForward(80, 80, protocol="sctp")], "port_forwards[0].protocol"),
        ([PortForward(80, 80), PortForward(80, 81)], "port_forwards[1].host_port"),
    ]
    for forwards, field in cases:
        with pytest.raises(ConfigError) as err:
            pf.set_port_forwards(OWNER, GUEST_IP, forwards)
        assert err.value.field == field
    # The same port over both protocols is fine (validation passes, then the namespace is missing).
    with pytest.raises(NetworkError, match="does not exist"):
        pf.set_port_forwards(OWNER, GUEST_IP, [PortForward(80, 80), PortForward(80, 80, "udp")])

"""The DHCP server layer (``network/dhcp.py``) against real dnsmasq and real DHCP clients.

Topology, all in namespaces the test creates: a "host" namespace with a bridge (the address
10.96.0.1/24, as the plugin's bridge has its gateway address) and, for each client, a namespace
whose ``eth0`` is a veth port of that bridge with a chosen MAC. The clients are busybox
``udhcpc``, the same client the tiny guest runs, taken from the busybox-static package the tiny
guest is built from (tests/dhcp_client.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import psutil
import pytest

from nomad_vm.errors import NetworkError
from nomad_vm.network.dhcp import DhcpHost, DhcpServer
from nomad_vm.network.settings import find_dnsmasq
from tests.dhcp_client import ask_for_lease
from tests.netns import Namespaces, ip, isolated_namespaces, pids_in

pytestmark = pytest.mark.integration

BRIDGE = "nvdbr0"
SUBNET = IPv4Network("10.96.0.0/24")
GATEWAY = IPv4Address("10.96.0.1")
MAC_A = "52:54:00:00:0d:0a"
MAC_B = "52:54:00:00:0d:0b"

PORT_67_HOLDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 67))
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Lan:
    spaces: Namespaces
    host: str
    state_dir: Path
    busybox: Path

    def server(self) -> DhcpServer:
        netns = f"/run/netns/{self.host}"
        return DhcpServer(self.state_dir, BRIDGE, SUBNET, find_dnsmasq(None), netns)

    def client(self, mac: str) -> str:
        """A namespace whose eth0 (MAC ``mac``) is a port of the bridge."""
        ns = self.spaces.new()
        port = f"nvd{mac[-2:]}"
        ip("-n", self.host, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        ip("-n", self.host, "link", "set", port, "master", BRIDGE, "up")
        ip("-n", ns, "link", "set", "eth0", "address", mac, "up")
        return ns

    def ask(self, ns: str, tries: int = 5) -> str:
        return ask_for_lease(self.busybox, ns, tries)


@pytest.fixture
def lan(busybox: Path, tmp_path: Path) -> Iterator[Lan]:
    with isolated_namespaces((BRIDGE, "nvd")) as spaces:
        host = spaces.new()
        ip("-n", host, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", host, "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        ip("-n", host, "link", "set", BRIDGE, "up")
        yield Lan(spaces, host, tmp_path / "state", busybox)


def host(mac: str, last_octet: int, name: str, dns: tuple[str, ...] = ()) -> DhcpHost:
    return DhcpHost(mac, SUBNET[last_octet], name, GATEWAY, tuple(IPv4Address(d) for d in dns))


def test_each_known_mac_gets_its_address_and_an_unknown_one_gets_none(lan: Lan) -> None:
    server = lan.server()
    client_a, client_b = lan.client(MAC_A), lan.client(MAC_B)
    server.add("task-a", host(MAC_A, 42, "vm-a", dns=("10.96.0.53",)))
    assert lan.ask(client_a) == (
        "bound ip=10.96.0.42 mask=24 router=10.96.0.1 dns=10.96.0.53 hostname=vm-a"
    )
    assert server.leases() == {MAC_A: IPv4Address("10.96.0.42")}
    # A MAC the driver did not register (another guest, a stray machine on the bridge).
    assert lan.ask(client_b, tries=2) == ""

    daemon = server.running()
    assert daemon is not None and daemon.pid in pids_in(lan.host)
    server.remove("task-a")
    server.remove("task-a")  # idempotent
    assert server.running() is None and daemon.pid not in pids_in(lan.host)
    assert not server.directory.exists() and not server.lock_path.exists()


def test_an_address_moves_to_a_new_mac_once_its_task_is_gone(lan: Lan) -> None:
    """The pool hands a released address to the next task: dnsmasq must not keep refusing it
    because the old guest's lease is still on file ("leased to another client")."""
    server = lan.server()
    client_a, client_b, client_c = (
        lan.client(MAC_A),
        lan.client(MAC_B),
        lan.client("52:54:00:00:0d:0c"),
    )
    server.add("task-a", host(MAC_A, 20, "vm-a"))
    server.add("task-c", host("52:54:00:00:0d:0c", 30, "vm-c"))
    assert "ip=10.96.0.20 " in lan.ask(client_a)
    assert "ip=10.96.0.30 " in lan.ask(client_c)

    server.remove("task-a")
    server.add("task-b", host(MAC_B, 20, "vm-b"))
    assert "ip=10.96.0.20 " in lan.ask(client_b)
    assert server.leases() == {MAC_B: SUBNET[20], "52:54:00:00:0d:0c": SUBNET[30]}
    # The other guest's lease survived the restarts: it renews the same address.
    assert "ip=10.96.0.30 " in lan.ask(client_c)
    for owner in ("task-b", "task-c"):
        server.remove(owner)
    assert server.running() is None


def test_a_dead_server_is_started_again_and_a_failed_start_leaves_nothing(lan: Lan) -> None:
    server = lan.server()
    client = lan.client(MAC_A)
    server.add("task-a", host(MAC_A, 42, "vm-a"))
    daemon = server.running()
    assert daemon is not None
    victim = psutil.Process(daemon.pid)
    victim.kill()
    # kill(2) only queues the signal: wait until the process is really gone (or a zombie).
    psutil.wait_procs([victim], timeout=10)
    assert server.running() is None
    assert server.ensure_running() is True
    assert server.ensure_running() is False  # already running
    assert "ip=10.96.0.42 " in lan.ask(client)
    server.remove("task-a")

    # Port 67 taken by a program that does not share it (a DHCP server without
    # SO_REUSEADDR): a clear error, no dnsmasq of ours left, and the server's files go with
    # the task's teardown. (Another dnsmasq bound to the bridge would not conflict.)
    holder = lan.spaces.spawn(lan.host, PORT_67_HOLDER)
    with pytest.raises(NetworkError, match=r"did not start: .*Address already in use"):
        server.add("task-b", host(MAC_B, 43, "vm-b"))
    assert pids_in(lan.host) == [holder.pid]
    server.remove("task-b")
    assert not server.directory.exists() and not server.lock_path.exists()

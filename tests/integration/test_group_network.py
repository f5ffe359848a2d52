"""Group-mode networking against a real kernel, in a namespace standing in for an allocation's.

The test creates the "allocation" namespace itself (as Nomad would, and hands the driver its
path); the driver's bridge, TAP, sysctls and nftables rules must appear only there. Teardown
must work while the namespace exists and, idempotently, after it is gone.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nomad_vm.driver.network_plan import GROUP_BRIDGE, NetworkRecord, plan_network
from nomad_vm.driver.networking import NetworkManager
from nomad_vm.driver.types import PortMapping
from nomad_vm.network import links, sysctl, taps
from nomad_vm.network.netns import netns_exists
from nomad_vm.network.nft import PortForwarder
from nomad_vm.network.settings import NicRequest, parse_bridge_network
from tests.dhcp_client import ask_for_lease
from tests.netns import isolated_namespaces, pids_in

pytestmark = pytest.mark.integration

PREFIX = "nvg"


@pytest.fixture
def alloc_netns() -> Iterator[str]:
    """The path of a fresh namespace (deleted and checked for leaks afterwards)."""
    with isolated_namespaces((GROUP_BRIDGE, PREFIX)) as spaces:
        yield f"/run/netns/{spaces.new()}"


def test_setup_lives_in_the_namespace_and_teardown_survives_its_end(
    alloc_netns: str, tmp_path: Path
) -> None:
    assert os.geteuid() == 0
    owner = f"alloc-{secrets.token_hex(3)}/vm/1"
    ports = (PortMapping("http", 24567, 8080, "127.0.0.1"),)
    plan = plan_network(owner, NicRequest("", ("http",)), None, ports, alloc_netns)
    assert plan is not None
    manager = NetworkManager(tmp_path)
    recorded: list[NetworkRecord] = []
    attachment = manager._setup(plan, recorded.append)
    record = attachment.record
    # Recorded before the first step, then again with the address once it was leased.
    assert [r.address for r in recorded] == ["", "192.168.254.2"] and recorded[-1] == record
    assert (record.netns, attachment.address) == (alloc_netns, IPv4Address("192.168.254.2"))
    assert attachment.override is None

    assert links.bridge_ports(GROUP_BRIDGE, netns=alloc_netns) == [record.tap]
    assert sysctl.read("net/ipv4/ip_forward", netns=alloc_netns) == "1"
    rules = PortForwarder(netns=alloc_netns).rules(owner, family="ip")
    assert len(rules) == 3, rules  # prerouting + output DNAT to :8080, localhost masquerade
    assert "192.168.254.2" in str(rules) and "8080" in str(rules)
    # The guest guard, in the namespace's bridge table: the TAP's frames only from its MAC.
    guard = PortForwarder(netns=alloc_netns).rules(owner, family="bridge")
    assert record.tap in str(guard) and record.guest_mac in str(guard), guard
    assert not links.link_exists(record.tap), "the TAP must not be in the plugin's namespace"

    # The descriptor QEMU gets: attached to the TAP inside the namespace.
    fd = taps.open_tap(record.tap, netns=alloc_netns)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun"
    finally:
        os.close(fd)

    manager._teardown(record, None)
    assert links.bridge_ports(GROUP_BRIDGE, netns=alloc_netns) == []
    assert PortForwarder(netns=alloc_netns).rules(owner) == []
    assert not list((tmp_path / "group").glob("leases-*")), "the allocation's pool file stays"

    # A second start, then the namespace vanishes before DestroyTask (Nomad deleted it).
    attachment = manager._setup(plan, recorded.append)
    name = alloc_netns.rsplit("/", 1)[-1]
    subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)
    assert not netns_exists(alloc_netns)
    manager._teardown(attachment.record, None)
    manager._teardown(attachment.record, None)  # idempotent
    assert not list((tmp_path / "group").glob("leases-*"))
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)  # for the fixture


def test_dhcp_mode_serves_the_vm_inside_the_allocation_namespace(
    tmp_path: Path, busybox: Path
) -> None:
    """With the plugin's ``dhcp = true``, the allocation's bridge gets its own dnsmasq, inside
    the allocation's namespace; it must go with the task even when Nomad deleted the namespace
    first (the dnsmasq process alone would keep that namespace alive)."""
    with isolated_namespaces((GROUP_BRIDGE, PREFIX)) as spaces:
        alloc = spaces.new()
        alloc_netns = f"/run/netns/{alloc}"
        plugin_net = parse_bridge_network({"subnet_cidr": "10.99.0.0/24", "dhcp": True}, tmp_path)
        assert plugin_net is not None and plugin_net.dnsmasq is not None
        owner = f"alloc-{secrets.token_hex(3)}/vm/1"
        plan = plan_network(owner, NicRequest(""), plugin_net, (), alloc_netns, hostname="vm-g")
        assert plan is not None
        manager = NetworkManager(tmp_path)
        record = manager._setup(plan, lambda _: None).record

        # A stand-in for the VM: a namespace whose eth0, with the guest's MAC, is a port of the
        # allocation's bridge (where the TAP would be).
        vm = spaces.new()
        subprocess.run(["ip", "-n", alloc, "link", "add", "nvgdhcp", "type", "veth", "peer",
                        "name", "eth0", "netns", vm], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", alloc, "link", "set", "nvgdhcp", "master", GROUP_BRIDGE,
                        "up"], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", vm, "link", "set", "eth0", "address", record.guest_mac,
                        "up"], check=True)  # fmt: skip
        assert ask_for_lease(busybox, vm) == (
            "bound ip=192.168.254.2 mask=28 router=192.168.254.1 dns= hostname=vm-g"
        )
        server = manager._dhcp(record, plugin_net)
        daemon = server.running()
        assert daemon is not None and daemon.pid in pids_in(alloc)
        assert server.directory.parent == tmp_path / "dhcp"

        subprocess.run(["ip", "netns", "del", alloc], check=True, timeout=30)
        manager._teardown(record, plugin_net)
        assert server.running() is None
        assert list((tmp_path / "dhcp").iterdir()) == []
        subprocess.run(["ip", "netns", "add", alloc], check=True, timeout=30)  # for the fixture


def flush_ruleset(netns: str) -> None:
    name = netns.rsplit("/", 1)[-1]
    subprocess.run(["ip", "netns", "exec", name, "nft", "flush", "ruleset"], check=True)


def test_reconcile_restores_both_guards_or_else_closes_route_localnet(
    alloc_netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone flushed the namespace's rules while the plugin was away: reconcile puts the
    bridge's loopback guard and the guest's guard back; where nft cannot be used, it turns
    route_localnet off, so the hole the guard covers is closed either way."""
    owner = f"alloc-{secrets.token_hex(3)}/vm/1"
    plan = plan_network(owner, NicRequest(""), None, (), alloc_netns)
    assert plan is not None
    manager = NetworkManager(tmp_path)
    record = manager._setup(plan, lambda _: None).record
    journalled = {owner}  # the tasks with a network in their journal
    nft = PortForwarder(netns=alloc_netns)
    key = f"net/ipv4/conf/{GROUP_BRIDGE}/route_localnet"
    guard = [r.expr for r in nft.rules(owner, family="bridge")]
    assert guard and nft.has_loopback_guard(GROUP_BRIDGE)
    assert manager._reconcile(record, None, journalled) == []  # nothing to repair

    flush_ruleset(alloc_netns)
    assert manager._reconcile(record, None, journalled) == [
        f"guard rules of bridge {GROUP_BRIDGE} restored (guests could reach the host's "
        "127.0.0.1 without them)",
        f"guest guard on {record.tap} restored",
    ]
    assert nft.has_loopback_guard(GROUP_BRIDGE)
    assert [r.expr for r in nft.rules(owner, family="bridge")] == guard
    assert sysctl.read(key, netns=alloc_netns) == "1"

    flush_ruleset(alloc_netns)
    monkeypatch.setattr(PortForwarder, "_binary", lambda self: "/bin/false")
    repaired = manager._reconcile(record, None, journalled)
    assert repaired[0].startswith(f"guard rules of bridge {GROUP_BRIDGE} could not be checked")
    assert "route_localnet turned off on it" in repaired[0]
    assert repaired[1].startswith(f"guest guard on {record.tap} could not be checked")
    assert sysctl.read(key, netns=alloc_netns) == "0"
    monkeypatch.undo()
    manager._teardown(record, None)
    assert links.bridge_ports(GROUP_BRIDGE, netns=alloc_netns) == []

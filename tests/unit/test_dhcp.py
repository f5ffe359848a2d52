"""DHCP mode without a network: the dnsmasq command line, the host records, finding dnsmasq,
and the plugin option. tests/integration/test_dhcp_server.py runs the real thing."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from nomad_vm.driver.network_plan import (
    GROUP_BRIDGE,
    NetworkAttachment,
    NetworkRecord,
    group_network,
    network_event,
    plan_network,
)
from nomad_vm.errors import ConfigError
from nomad_vm.network.dhcp import DhcpHost, dnsmasq_argv, server_key
from nomad_vm.network.settings import NicRequest, find_dnsmasq, parse_bridge_network

A = IPv4Address
HOST = DhcpHost("52:54:00:12:34:56", A("10.89.0.7"), "web-1", A("10.89.0.1"), (A("1.1.1.1"),))


def test_argv_serves_only_the_given_hosts_on_one_bridge() -> None:
    other = DhcpHost("52:54:00:aa:aa:aa", A("10.89.0.8"), "", A("10.89.0.254"))  # no name
    argv = dnsmasq_argv(
        Path("/usr/sbin/dnsmasq"), Path("/d"), "br0", IPv4Network("10.89.0.0/24"),
        {"task-1": HOST, "task-2": other},
    )  # fmt: skip
    assert argv[0] == "/usr/sbin/dnsmasq"
    assert {"--conf-file=/dev/null", "--port=0", "--interface=br0", "--bind-interfaces"} <= set(
        argv
    )
    assert "--dhcp-range=10.89.0.0,static,255.255.255.0,12h" in argv
    hosts = [a for a in argv if a.startswith("--dhcp-host=")]
    assert len(hosts) == 2
    tag = hosts[0].split(",")[1].removeprefix("set:")
    assert hosts[0] == f"--dhcp-host=52:54:00:12:34:56,set:{tag},10.89.0.7,web-1"
    assert f"--dhcp-option=tag:{tag},option:router,10.89.0.1" in argv
    assert f"--dhcp-option=tag:{tag},option:dns-server,1.1.1.1" in argv
    # Each host its own router; no DNS option for a host without name servers.
    tag2 = hosts[1].split(",")[1].removeprefix("set:")
    assert tag2 != tag and f"--dhcp-option=tag:{tag2},option:router,10.89.0.254" in argv
    assert hosts[1] == f"--dhcp-host=52:54:00:aa:aa:aa,set:{tag2},10.89.0.8"
    assert not [a for a in argv if a.startswith(f"--dhcp-option=tag:{tag2},option:dns")]
    assert "--pid-file=/d/dnsmasq.pid" in argv and "--dhcp-leasefile=/d/leases" in argv


def test_host_records_round_trip_and_servers_are_keyed_by_bridge_or_namespace() -> None:
    assert DhcpHost.from_dict(HOST.to_dict()) == HOST
    assert server_key("br0", None) == "br0"
    group = server_key(GROUP_BRIDGE, "/run/netns/alloc-1")
    assert group.startswith("group-") and group != server_key(GROUP_BRIDGE, "/run/netns/alloc-2")


def test_dhcp_option_needs_dnsmasq_and_names_the_field(tmp_path: Path) -> None:
    block = {"subnet_cidr": "10.89.0.0/24"}
    assert parse_bridge_network(block, tmp_path).dnsmasq is None  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as err:
        parse_bridge_network({**block, "dhcp": True, "dnsmasq_binary": "/no/dnsmasq"}, tmp_path)
    assert err.value.field == "config.network.dnsmasq_binary"
    assert "DHCP mode needs dnsmasq" in str(err.value) and "does not exist" in str(err.value)


def test_dnsmasq_is_found_in_sbin_when_path_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.access("/usr/sbin/dnsmasq", os.X_OK):
        pytest.fail("dnsmasq is not installed: `make setup` installs dnsmasq-base")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_dnsmasq(None) == Path("/usr/sbin/dnsmasq")
    monkeypatch.setattr("nomad_vm.network.settings.SBIN_DNSMASQ", Path("/nonexistent/dnsmasq"))
    with pytest.raises(ConfigError) as err:
        find_dnsmasq("")
    assert err.value.field == "config.network.dhcp" and "dnsmasq-base" in str(err.value)


def test_group_mode_inherits_dhcp_and_events_say_how_the_guest_learns_its_address(
    tmp_path: Path,
) -> None:
    net = parse_bridge_network({"subnet_cidr": "10.89.0.0/24", "dhcp": True}, tmp_path)
    assert net is not None and net.dnsmasq is not None
    assert group_network(net).dnsmasq == net.dnsmasq and group_network().dnsmasq is None
    plan = plan_network("t1", NicRequest(""), net, (), hostname="vm-1")
    assert plan is not None and plan.hostname == "vm-1"
    record = NetworkRecord("t1", "nomadvm0", "nvmabc", plan.guest_mac, "10.89.0.2")
    attachment = NetworkAttachment(record, A("10.89.0.2"), 24, A("10.89.0.1"), (), {})
    assert network_event(attachment, plan, has_seed=False) == (
        f"Network: 10.89.0.2 on nvmabc, served by DHCP to {plan.guest_mac}"
    )
    plain = plan_network("t1", NicRequest(""), parse_bridge_network(
        {"subnet_cidr": "10.89.0.0/24"}, tmp_path), ())  # fmt: skip
    assert plain is not None
    assert network_event(attachment, plain, has_seed=True) == "Network: 10.89.0.2 on nvmabc"
    assert "must configure that address itself" in network_event(attachment, plain, False)

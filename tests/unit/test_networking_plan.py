"""Bridge networking: the plugin's block, a task's network_interface, the plan and the guest's
network-config (no host changes here; tests/integration/test_vm_network.py does those)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nomad_vm.driver.network_plan import (
    NetworkAttachment,
    NetworkRecord,
    network_config,
    plan_network,
)
from nomad_vm.driver.types import PortMapping
from nomad_vm.errors import ConfigError
from nomad_vm.network.settings import NicRequest, parse_bridge_network, parse_nic

BLOCK = {"bridge": "nvtbr0", "subnet_cidr": "10.99.0.0/24"}


def net(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    return parse_bridge_network({**BLOCK, **extra}, tmp_path)


def test_defaults_derive_from_the_subnet(tmp_path: Path) -> None:
    n = net(tmp_path)
    assert (n.gateway, n.pool_start, n.pool_end) == (
        IPv4Address("10.99.0.1"),
        IPv4Address("10.99.0.2"),
        IPv4Address("10.99.0.254"),
    )
    assert n.gateway_cidr == "10.99.0.1/24" and n.tap_prefix == "nvm"


def test_no_subnet_means_no_bridge_networking(tmp_path: Path) -> None:
    assert parse_bridge_network({"bridge": "x", "subnet_cidr": ""}, tmp_path) is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"subnet_cidr": "10.99.0.1/24"}, "config.network.subnet_cidr"),  # host bits set
        ({"subnet_cidr": "fd00::/64"}, "config.network.subnet_cidr"),
        ({"gateway": "10.98.0.1"}, "network.gateway"),
        ({"ip_pool_start": "banana"}, "config.network.ip_pool_start"),
        ({"ip_pool_start": "10.99.0.50", "ip_pool_end": "10.99.0.40"}, "network.ip_pool_end"),
        ({"tap_prefix": "much-too-long"}, "network.tap_prefix"),
    ],
)
def test_bad_plugin_network_blocks_name_the_field(
    tmp_path: Path, extra: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        net(tmp_path, **extra)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("extra", "advice"),
    [
        ({"gateway": "10.99.0.1", "ip_pool_start": "10.99.0.1"}, 'ip_pool_start = "10.99.0.2"'),
        ({"gateway": "10.99.0.254", "ip_pool_start": "10.99.0.2"}, 'ip_pool_end = "10.99.0.253"'),
        (
            {"gateway": "10.99.0.50", "ip_pool_start": "10.99.0.10", "ip_pool_end": "10.99.0.90"},
            "outside ip_pool_start..ip_pool_end",
        ),
    ],
)
def test_a_gateway_inside_the_pool_is_refused_with_a_way_out(
    tmp_path: Path, extra: dict[str, object], advice: str
) -> None:
    with pytest.raises(ConfigError) as err:
        net(tmp_path, **extra)
    assert err.value.field == "config.network.gateway"
    assert "inside the address pool" in err.value.reason and "handed to VMs" in err.value.reason
    assert advice in err.value.reason
    assert not (tmp_path / "network").exists()


@pytest.mark.parametrize(
    "extra",
    [
        {"gateway": "10.99.0.1", "ip_pool_start": "10.99.0.2"},
        {"gateway": "10.99.0.254", "ip_pool_start": "10.99.0.1", "ip_pool_end": "10.99.0.253"},
        {"gateway": "10.99.0.100"},  # the default pool starts after the gateway
        {"gateway": "10.99.0.1", "ip_pool_start": "10.99.0.100", "ip_pool_end": "10.99.0.110"},
    ],
)
def test_a_gateway_outside_the_pool_is_accepted(tmp_path: Path, extra: dict[str, object]) -> None:
    n = net(tmp_path, **extra)
    assert not n.pool_start <= n.gateway <= n.pool_end


def test_nic_block_parsing() -> None:
    nic = parse_nic(
        {
            "bridge": {
                "name": "nvtbr0",
                "ports": ["http"],
                "static_ip": "10.99.0.5",
                "gateway": None,
                "netmask": "255.255.0.0",
                "dns": ["10.99.0.1"],
            },
            "vlan": 7,
        }
    )
    assert nic == NicRequest(
        "nvtbr0", ("http",), IPv4Address("10.99.0.5"), None, 16, (IPv4Address("10.99.0.1"),), 7
    )
    assert parse_nic({}) is None


@pytest.mark.parametrize(
    ("bridge", "field"),
    [
        ({"static_ip": "10.99.0"}, "config.network_interface.bridge.static_ip"),
        ({"netmask": "255.0.255.0"}, "config.network_interface.bridge.netmask"),
        ({"dns": ["ok?"]}, "config.network_interface.bridge.dns[0]"),
    ],
)
def test_bad_nic_values_name_the_field(bridge: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_nic({"bridge": bridge})
    assert err.value.field == field


PORTS = (PortMapping("http", 20080, 8080), PortMapping("metrics", 20090, 0))


def test_plan_maps_labels_to_forwards(tmp_path: Path) -> None:
    plan = plan_network("alloc/web/1", NicRequest("", ("http", "metrics")), net(tmp_path), PORTS)
    assert plan is not None
    assert [(label, f.host_port, f.guest_port) for label, f in plan.forwards] == [
        ("http", 20080, 8080),
        ("metrics", 20090, 20090),  # no `to`: the same number in the guest
    ]
    assert len(plan.tap) == 15 and plan.tap.startswith("nvm")
    again = plan_network("alloc/web/1", NicRequest(""), net(tmp_path), PORTS)
    assert again is not None and (again.tap, again.guest_mac) == (plan.tap, plan.guest_mac)


def test_plan_refuses_unknown_labels_other_bridges_and_missing_plugin_network(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as err:
        plan_network("t", NicRequest("", ("http", "nope")), net(tmp_path), PORTS)
    assert err.value.field == "config.network_interface.bridge.ports[1]"
    assert "ports: http, metrics" in str(err.value)
    with pytest.raises(ConfigError) as err:
        plan_network("t", NicRequest("br9"), net(tmp_path), PORTS)
    assert err.value.field == "config.network_interface.bridge.name"
    with pytest.raises(ConfigError) as err:
        plan_network("t", NicRequest(""), None, PORTS)
    assert err.value.field == "config.network_interface" and "subnet_cidr" in str(err.value)
    assert plan_network("t", None, None, PORTS) is None


def test_network_config_is_v2_matched_by_mac() -> None:
    attachment = NetworkAttachment(
        record=NetworkRecord("t", "nvtbr0", "nvmx", "52:00:00:00:00:01", "10.99.0.7"),
        address=IPv4Address("10.99.0.7"),
        prefixlen=24,
        gateway=IPv4Address("10.99.0.1"),
        dns=(IPv4Address("10.99.0.1"),),
        port_map={"http": 8080},
    )
    assert network_config(attachment) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "52:00:00:00:00:01"},
                "set-name": "eth0",
                "addresses": ["10.99.0.7/24"],
                "gateway4": "10.99.0.1",
                "nameservers": {"addresses": ["10.99.0.1"]},
            }
        },
    }
    assert attachment.override.address == "10.99.0.7"

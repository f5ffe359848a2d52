"""Group networking (a job's network { mode = "bridge" }): what Nomad sends, the plan, the record,
the override and QEMU's argv. No host changes (tests/integration/test_group_network.py has those).
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.network_plan import (
    GROUP_BRIDGE,
    GROUP_SUBNET,
    NetworkAttachment,
    NetworkRecord,
    network_config,
    plan_network,
)
from nomad_vm.driver.types import PortMapping
from nomad_vm.errors import ConfigError
from nomad_vm.network.ipam import AddressPool
from nomad_vm.network.settings import NicRequest, parse_bridge_network
from nomad_vm.plugin import convert
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.spec import NicSpec, VMSpec

NETNS = "/var/run/netns/0b7a6f0e-1d4c-4a43-9d55-2f8a3c1e6b21"
PORTS = (PortMapping("http", 24567, 8080, "127.0.0.1"), PortMapping("raw", 25001, 0))
Spec = driver_pb2.NetworkIsolationSpec


def test_capabilities_advertise_host_and_group() -> None:
    caps = convert.capabilities(VMDriver().capabilities())
    assert list(caps.network_isolation_modes) == [Spec.HOST, Spec.GROUP]
    assert not caps.must_create_network  # Nomad makes the namespace itself


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ""),  # no spec at all: host mode
        (Spec(mode=Spec.HOST), ""),
        (Spec(mode=Spec.GROUP, path=NETNS), NETNS),
        (Spec(mode=Spec.NONE, path=NETNS), ""),
    ],
)
def test_task_config_carries_the_group_namespace(spec: Spec | None, expected: str) -> None:
    pb = driver_pb2.TaskConfig(id="a/vm/1", name="vm")
    if spec is not None:
        pb.network_isolation_spec.CopyFrom(spec)
    assert convert.task_config(pb).netns_path == expected


def test_group_plan_forwards_the_ports_to_inside_the_namespace() -> None:
    # No plugin bridge configured: group mode does not need one.
    plan = plan_network("a/vm/1", NicRequest("", ("http", "raw")), None, PORTS, NETNS)
    assert plan is not None
    assert plan.netns == NETNS
    assert (plan.net.bridge, plan.net.subnet) == (GROUP_BRIDGE, GROUP_SUBNET)
    assert plan.net.create_bridge and plan.net.nat
    assert str(plan.net.gateway) == "192.168.254.1"
    assert str(plan.net.pool_start) == "192.168.254.2"
    # Nomad's portmap delivers host:value at <namespace address>:to; the VM gets `to` too.
    assert [(label, f.host_port, f.guest_port, f.host_ip) for label, f in plan.forwards] == [
        ("http", 8080, 8080, None),
        ("raw", 25001, 25001, None),
    ]
    assert len(plan.tap) == 15 and plan.tap.startswith("nvm")


def test_group_plan_keeps_the_plugin_tap_prefix(tmp_path: Path) -> None:
    net = parse_bridge_network({"subnet_cidr": "10.99.0.0/24", "tap_prefix": "nve"}, tmp_path)
    plan = plan_network("a/vm/1", NicRequest(""), net, PORTS, NETNS)
    assert plan is not None and plan.tap.startswith("nve")
    assert plan.net.bridge == GROUP_BRIDGE  # never the plugin's bridge


@pytest.mark.parametrize(
    ("nic", "field"),
    [
        (NicRequest("nomadvm0"), "config.network_interface.bridge.name"),
        (
            NicRequest("", static_ip=IPv4Address("192.168.254.5")),
            "config.network_interface.bridge.static_ip",
        ),
        (
            NicRequest("", gateway=IPv4Address("192.168.254.1")),
            "config.network_interface.bridge.gateway",
        ),
        (NicRequest("", prefixlen=24), "config.network_interface.bridge.netmask"),
        (NicRequest("", vlan=10), "config.network_interface.vlan"),
        (NicRequest("", ("nope",)), "config.network_interface.bridge.ports[0]"),
    ],
)
def test_group_plan_refuses_what_only_the_plugin_bridge_has(nic: NicRequest, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_network("a/vm/1", nic, None, PORTS, NETNS)
    assert err.value.field == field


def test_record_keeps_the_namespace_and_reads_old_records() -> None:
    record = NetworkRecord(
        "a/vm/1", GROUP_BRIDGE, "nvmx", "52:00:00:00:00:01", "192.168.254.2", NETNS
    )
    assert NetworkRecord.from_dict(record.to_dict()) == record
    old = {"owner": "t", "bridge": "b", "tap": "x", "guest_mac": "52:00:00:00:00:02"}
    assert NetworkRecord.from_dict(old).netns == ""


def attachment(netns: str) -> NetworkAttachment:
    return NetworkAttachment(
        record=NetworkRecord(
            "t", GROUP_BRIDGE, "nvmx", "52:00:00:00:00:01", "192.168.254.2", netns
        ),
        address=IPv4Address("192.168.254.2"),
        prefixlen=GROUP_SUBNET.prefixlen,
        gateway=IPv4Address("192.168.254.1"),
        dns=(),
        port_map={"http": 8080},
    )


def test_group_mode_gives_nomad_no_override_and_the_guest_its_gateway() -> None:
    assert attachment(NETNS).override is None
    host = attachment("").override
    assert host is not None and host.address == "192.168.254.2"
    eth0 = network_config(attachment(NETNS))["ethernets"]["eth0"]
    assert eth0["addresses"] == ["192.168.254.2/28"]
    assert "192.168.254.1" in str(eth0)


def test_qemu_uses_the_tap_descriptor_when_given() -> None:
    spec = VMSpec(
        name="web",
        vcpus=1,
        memory_mb=256,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/n/qmp.sock"),
        nics=(NicSpec("nvmabcdefghijkl", "52:54:12:34:56:78", fd=7),),
    )
    argv = qemu_argv("qemu-system-x86_64", spec)
    assert "tap,id=net0,fd=7" in argv
    assert not any("ifname=" in a for a in argv)


def test_pool_file_goes_away_with_its_last_lease(tmp_path: Path) -> None:
    pool = AddressPool(
        tmp_path / "leases.json",
        GROUP_SUBNET,
        IPv4Address("192.168.254.1"),
        IPv4Address("192.168.254.2"),
        IPv4Address("192.168.254.14"),
    )
    assert pool.allocate("a") == IPv4Address("192.168.254.2")
    assert pool.allocate("b") == IPv4Address("192.168.254.3")
    pool.release("a")
    assert not pool.discard_if_empty()
    assert pool.path.exists()
    pool.release("b")
    assert pool.discard_if_empty()
    assert not pool.path.exists() and not pool.lock_path.exists()
    # Usable again afterwards (a fresh lock file).
    assert pool.allocate("c") == IPv4Address("192.168.254.2")

"""The macvtap form of network_interface: parsing, plan, record and the guest's network-config
(pure; the host side is tests/integration/test_macvtap.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.macvtap_plan import (
    MacvtapAttachment,
    macvtap_network_config,
    macvtap_record,
    plan_macvtap,
)
from nomad_vm.driver.network_plan import NetworkRecord
from nomad_vm.driver.startup import plan_start
from nomad_vm.driver.types import AgentInfo
from nomad_vm.errors import ConfigError
from nomad_vm.network.names import mac_address, tap_name
from nomad_vm.network.settings import MacvtapRequest, parse_nic
from nomad_vm.vm.registry import HypervisorRegistry
from tests.fakes.hypervisor import CAPABILITIES, FakeHost, FakeHypervisor
from tests.unit.tasks import unit_task

FIELD = "config.network_interface.macvtap"


def block(**macvtap: object) -> dict[str, object]:
    return {"bridge": None, "macvtap": {"device": "eth0", "mode": "bridge", **macvtap}}


def test_the_seeds_block_parses_with_bridge_mode_by_default() -> None:
    assert parse_nic({"macvtap": {"device": "eth0"}}) == MacvtapRequest("eth0", "bridge")
    nic = parse_nic(block(mode="vepa", static_ip="10.0.0.9", netmask="24", gateway="10.0.0.1"))
    assert nic == MacvtapRequest(
        "eth0", "vepa", IPv4Address("10.0.0.9"), IPv4Address("10.0.0.1"), 24
    )


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"ports": ["http"]}, f"{FIELD}.ports", "no port forwarding"),
        ({"device": ""}, f"{FIELD}.device", "required"),
        ({"static_ip": "10.0.0.9"}, f"{FIELD}.netmask", "required with static_ip"),
        ({"gateway": "10.0.0.1"}, f"{FIELD}.gateway", "only goes with static_ip"),
        ({"static_ip": "nope", "netmask": "24"}, f"{FIELD}.static_ip", "not an IPv4"),
        ({"dns": ["1.1.1.1", "x"]}, f"{FIELD}.dns[1]", "not an IPv4"),
    ],
)
def test_bad_values_name_their_field(values: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_nic(block(**values))
    assert err.value.field == field and words in str(err.value)


def test_bridge_and_macvtap_together_or_with_a_vlan_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_nic({**block(), "bridge": {"name": "br0"}})
    assert err.value.field == FIELD
    with pytest.raises(ConfigError) as err:
        parse_nic({**block(), "vlan": 5})
    assert err.value.field == "config.network_interface.vlan"


def test_plan_derives_name_and_mac_from_the_task_and_refuses_group_mode() -> None:
    plan = plan_macvtap("a/vm/1", MacvtapRequest("eth0"), ())
    assert (plan.name, plan.guest_mac) == (tap_name("nvm", "a/vm/1"), mac_address("a/vm/1"))
    record = macvtap_record(plan)
    assert (record.kind, record.lower, record.mode, record.bridge) == (
        "macvtap",
        "eth0",
        "bridge",
        "",
    )
    assert NetworkRecord.from_dict(record.to_dict()) == record
    with pytest.raises(ConfigError) as err:
        plan_macvtap("a/vm/1", MacvtapRequest("eth0"), (), netns="/var/run/netns/x")
    assert err.value.field == FIELD


def test_records_written_before_macvtap_read_as_bridge_records() -> None:
    old = {"owner": "t", "bridge": "b", "tap": "x", "guest_mac": "52:00:00:00:00:02"}
    record = NetworkRecord.from_dict(old)
    assert record.kind == "bridge" and not record.is_macvtap


def test_network_config_is_dhcp_or_static() -> None:
    plan = plan_macvtap("a/vm/1", MacvtapRequest("eth0"), ())
    dhcp = MacvtapAttachment(macvtap_record(plan), plan.nic)
    eth = macvtap_network_config(dhcp)["ethernets"]["eth0"]
    assert eth == {"match": {"macaddress": plan.guest_mac}, "set-name": "eth0", "dhcp4": True}
    assert dhcp.override is None

    nic = MacvtapRequest("eth0", "bridge", IPv4Address("10.0.0.9"), IPv4Address("10.0.0.1"), 24,
                         (IPv4Address("10.0.0.53"),))  # fmt: skip
    static = MacvtapAttachment(macvtap_record(plan_macvtap("a/vm/1", nic, ())), nic)
    eth = macvtap_network_config(static)["ethernets"]["eth0"]
    assert eth["addresses"] == ["10.0.0.9/24"] and eth["gateway4"] == "10.0.0.1"
    assert eth["nameservers"] == {"addresses": ["10.0.0.53"]} and "dhcp4" not in eth
    assert static.override is not None and static.override.address == "10.0.0.9"


class MacvtapQemu(FakeHypervisor):
    """The fake, declaring macvtap like the QEMU backend."""

    name = "qemu"
    capabilities = replace(CAPABILITIES, macvtap=True)


def test_a_device_outside_the_plugins_macvtap_devices_is_refused(tmp_path: Path) -> None:
    """Refused while planning, before the device is even looked up on the host."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "vmlinux").write_bytes(b"x")
    config = parse_plugin_config(
        {
            "data_dir": str(tmp_path / "data"),
            "image_paths": [str(tmp_path / "images")],
            "macvtap_devices": ["eth1", "eth0.100"],
        }
    )
    options = {
        "kernel": str(tmp_path / "images" / "vmlinux"),
        "share_task_dirs": False,
        "network_interface": {"macvtap": {"device": "eth9"}},
    }
    task = unit_task(tmp_path / "alloc", options)
    backends = HypervisorRegistry({"qemu": lambda: MacvtapQemu(FakeHost())}, default="qemu")
    with pytest.raises(ConfigError) as err:
        asyncio.run(plan_start(task, config, AgentInfo(), tmp_path / "run", backends))
    assert err.value.field == f"{FIELD}.device"
    assert "eth1, eth0.100" in err.value.reason


def test_macvtap_devices_must_be_interface_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_plugin_config({"data_dir": str(tmp_path), "macvtap_devices": ["eth0", "a/b"]})
    assert err.value.field == "config.macvtap_devices[1]"

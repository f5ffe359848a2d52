"""A task's macvtap NIC (``network_interface { macvtap { ... } }``) as planned, before anything
exists on the host: the link's name and the guest's MAC (both derived from the task id, so
recovery and teardown find them), the record the journal keeps, the result of the setup and the
guest's cloud-init network-config. The host changes are ``networking``'s.

Unlike the bridge form there is no bridge, pool, guard or forward of the plugin's: the guest is
on the lower device's own network and gets its address there (DHCP), or ``static_ip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from nomad_vm.driver.network_plan import GROUP_MODE, NetworkRecord
from nomad_vm.driver.types import NetworkOverride, PortMapping
from nomad_vm.errors import ConfigError
from nomad_vm.network.macvtap import MacvtapFields
from nomad_vm.network.names import DEFAULT_TAP_PREFIX, mac_address, tap_name
from nomad_vm.network.settings import NIC_FIELD, MacvtapRequest

MACVTAP_FIELD = f"{NIC_FIELD}.macvtap"
FIELDS = MacvtapFields(device=f"{MACVTAP_FIELD}.device", mode=f"{MACVTAP_FIELD}.mode")


@dataclass(frozen=True)
class MacvtapPlan:
    owner: str  # the task id
    nic: MacvtapRequest
    name: str  # the macvtap link
    guest_mac: str  # passthrough: replaced by the device's own at setup
    hostname: str = ""


@dataclass(frozen=True)
class MacvtapAttachment:
    """A macvtap that exists; the address only when it is static (DHCP's is the network's)."""

    record: NetworkRecord
    nic: MacvtapRequest

    @property
    def override(self) -> NetworkOverride | None:
        """A static address is what Nomad should advertise; a DHCP one is unknown here, and
        there are no port forwards to report."""
        if self.nic.static_ip is None:
            return None
        return NetworkOverride(str(self.nic.static_ip), {})


def plan_macvtap(
    owner: str,
    nic: MacvtapRequest,
    ports: tuple[PortMapping, ...],
    netns: str = "",
    hostname: str = "",
    tap_prefix: str = DEFAULT_TAP_PREFIX,
) -> MacvtapPlan:
    """Validation only: nothing touches the host (the device is checked at setup, where a
    missing one is a ConfigError naming ``device`` all the same)."""
    del ports  # the group's ports are Nomad's; a macvtap forwards none (no `ports` key)
    if netns:
        raise ConfigError(
            MACVTAP_FIELD,
            f"cannot be used in {GROUP_MODE}: the allocation's namespace holds no host "
            "interface to stack on; use network_interface.bridge there, or the host mode",
        )
    return MacvtapPlan(
        owner=owner,
        nic=nic,
        name=tap_name(tap_prefix, owner),
        guest_mac=mac_address(owner),
        hostname=hostname,
    )


def macvtap_record(plan: MacvtapPlan) -> NetworkRecord:
    """What the journal records before the link is created."""
    return NetworkRecord(
        owner=plan.owner,
        bridge="",
        tap=plan.name,
        guest_mac=plan.guest_mac,
        address=str(plan.nic.static_ip or ""),
        kind="macvtap",
        lower=plan.nic.device,
        mode=plan.nic.mode,
    )


def macvtap_network_config(attachment: MacvtapAttachment) -> dict[str, Any]:
    """cloud-init network-config v2: the NIC matched by its MAC, by DHCP from the device's
    network, or static (``gateway4`` for the reason ``network_plan.network_config`` gives)."""
    nic = attachment.nic
    eth: dict[str, Any] = {
        "match": {"macaddress": attachment.record.guest_mac},
        "set-name": "eth0",
    }
    if nic.static_ip is None:
        eth["dhcp4"] = True
    else:
        eth["addresses"] = [f"{nic.static_ip}/{nic.prefixlen}"]
        if nic.gateway is not None:
            eth["gateway4"] = str(nic.gateway)
    if nic.dns:
        eth["nameservers"] = {"addresses": [str(d) for d in nic.dns]}
    return {"version": 2, "ethernets": {"eth0": eth}}


def macvtap_event(attachment: MacvtapAttachment) -> str:
    record = attachment.record
    static: IPv4Address | None = attachment.nic.static_ip
    how = f"static {static}" if static else "address by DHCP from that network"
    return (
        f"Network: macvtap {record.tap} on {record.lower} (mode {record.mode}), guest MAC "
        f"{record.guest_mac}, {how}"
    )

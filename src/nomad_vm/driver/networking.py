"""A VM task's bridge networking, host side: address, TAP, port forwards, and their teardown.

Start order, each step recorded in the task's journal before it is taken (``record``, see
``driver.journal``), so that whatever happens in between (an error, a plugin SIGKILLed
mid-start) ``teardown`` can undo exactly what exists:

1. the task's record (bridge, TAP name, MAC; derived from the task id) is recorded;
2. the bridge is made ready (created when ``create_bridge``; guard rules, IP forwarding, NAT);
3. the address is leased (``static_ip`` or the pool) and added to the record;
4. the task's nftables rules are set in one transaction: its guest guard
   (``nft.PortForwarder.set_guest_guard``: frames from the TAP only with the guest's MAC and
   address) and its port forwards, before the TAP exists, so the TAP never exists unguarded;
5. the TAP is created on the bridge (its name and MAC derive from the task id);
6. DHCP mode (``dhcp = true``): the bridge's dnsmasq learns the guest's MAC and address.

``teardown`` removes DHCP host, rules (forwards and guard, by the task's tag), TAP and lease;
every step is idempotent.

``reconcile`` (RecoverTask, after a plugin restart) also re-asserts what keeps guests in their
place, since the plugin was not there to see it removed (``nft flush ruleset``, a firewall
reload): the bridge's loopback guard, without which its ``route_localnet`` lets guests reach
the host's 127.0.0.1 (turned off when the guard cannot be put back), and the task's guest
guard.

Group mode (the job's ``network { mode = "bridge" }``: Nomad gives the task the path of the
allocation's network namespace): the same steps, but inside that namespace and on a bridge of
its own, ``GROUP_BRIDGE`` with the fixed subnet ``GROUP_SUBNET`` (the namespace is private to
the allocation, so every allocation may use the same addresses). The port forwards there take
the port's ``to`` (where Nomad's CNI portmap delivers it in the namespace) to the VM, outbound
traffic is masqueraded to the namespace's own address, and QEMU, which runs in the plugin's
namespace, gets the TAP as a file descriptor opened inside the allocation's one
(``taps.open_tap``). The record carries the namespace's path; teardown removes the TAP and the
rules only while the namespace still exists (Nomad deletes it, and everything in it, with the
allocation).

macvtap (``network_interface { macvtap { ... } }``, ``macvtap_plan``): one step, the link on
the host interface, recorded before it is created; teardown deletes it. No lease, rules or
DHCP host exist for it, so recovery only reports a link that has gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Set
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from nomad_vm.driver.macvtap_plan import (
    FIELDS,
    MacvtapAttachment,
    MacvtapPlan,
    macvtap_record,
)
from nomad_vm.driver.network_plan import (
    NetworkAttachment,
    NetworkPlan,
    NetworkRecord,
    group_network,
)
from nomad_vm.errors import NetworkError
from nomad_vm.network import links, macvtap, sysctl, taps
from nomad_vm.network.dhcp import DhcpHost, DhcpServer
from nomad_vm.network.ipam import AddressPool
from nomad_vm.network.names import tap_mac
from nomad_vm.network.netns import netns_exists
from nomad_vm.network.nft import DEFAULT_TABLE, PortForwarder
from nomad_vm.network.settings import BridgeNetwork

log = logging.getLogger(__name__)


# Saves the task's network record in its journal (called before each step, in the thread).
RecordNetwork = Callable[[NetworkRecord], None]


class NetworkManager:
    """Sets up and tears down task networks on this host; leases and DHCP state live in
    ``state_dir`` (the plugin's data_dir/network)."""

    def __init__(self, state_dir: Path, nft_table: str = DEFAULT_TABLE) -> None:
        self.state_dir = state_dir
        # The installed name's own tables (nomad_vm.identity): two names never touch each
        # other's rules.
        self.nft_table = nft_table
        self.forwarder = PortForwarder(table=nft_table)

    async def setup(
        self, plan: NetworkPlan | MacvtapPlan, record: RecordNetwork
    ) -> NetworkAttachment | MacvtapAttachment:
        if isinstance(plan, MacvtapPlan):
            return await asyncio.to_thread(self._setup_macvtap, plan, record)
        return await asyncio.to_thread(self._setup, plan, record)

    async def teardown(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        await asyncio.to_thread(self._teardown, record, net)

    async def open_tap(self, record: NetworkRecord) -> int:
        """A descriptor of the task's TAP for QEMU (``-netdev tap,fd=N``), opened by the plugin:
        QEMU runs unprivileged and could not attach to a TAP by name, nor find one that lives
        in an allocation's namespace (group mode). The caller closes it once QEMU has its
        copy."""
        if record.is_macvtap:
            return await asyncio.to_thread(macvtap.open_macvtap, record.tap)
        return await asyncio.to_thread(taps.open_tap, record.tap, netns=record.netns or None)

    async def reconcile(
        self, record: NetworkRecord, net: BridgeNetwork | None, recorded_owners: Set[str]
    ) -> list[str]:
        """After a plugin restart, for a recovered task: its lease is back in place (it is what
        keeps the address from being handed out twice), and leases of tasks no journal knows
        any more (``recorded_owners``: the tasks with a network in their journal) are dropped.
        Returns what was repaired, for a task event."""
        return await asyncio.to_thread(self._reconcile, record, net, recorded_owners)

    def _reconcile(
        self, record: NetworkRecord, net: BridgeNetwork | None, recorded_owners: Set[str]
    ) -> list[str]:
        if record.is_macvtap:
            return self._reconcile_macvtap(record)
        repaired = []
        if self._dhcp(record, net).ensure_running():
            repaired.append("DHCP server restarted")
        if not (record.netns or net is None or net.bridge != record.bridge or not record.address):
            pool = net.pool(self.state_dir)
            if record.owner not in pool.leases():
                pool.allocate(record.owner, IPv4Address(record.address))
                repaired.append(f"lease of {record.address} restored")
            stale = pool.reconcile({*recorded_owners, record.owner})
            repaired += [f"stale lease of {owner} released" for owner in stale]
        return repaired + self._reassert_guards(record, net)

    def _reconcile_macvtap(self, record: NetworkRecord) -> list[str]:
        """A macvtap has no lease, rules or DHCP host of ours to put back; only the link
        itself, which nobody can recreate under a running QEMU (its descriptor is the old
        link's), so a missing one is reported, not repaired."""
        lower = macvtap.macvtap_lower(record.tap)
        if lower is None:
            return [f"macvtap {record.tap} is gone: the guest has lost its network"]
        if lower != record.lower:
            return [f"macvtap {record.tap} is on {lower}, not {record.lower}"]
        return []

    def _reassert_guards(self, record: NetworkRecord, net: BridgeNetwork | None) -> list[str]:
        """The record's bridge keeps its loopback guard (or loses route_localnet), and the
        task's guest keeps its guard; what had to be put back (or could not be), for the task
        event."""
        netns = record.netns or None
        if netns is not None and not netns_exists(netns):
            return []  # Nomad deleted the namespace, and the bridge and rules with it
        forwarder = self._forwarder(netns)
        bridge_net = group_network(net) if record.netns else net
        if bridge_net is not None and bridge_net.bridge != record.bridge:
            bridge_net = None
        repaired = []
        try:
            if not forwarder.has_loopback_guard(record.bridge):
                if bridge_net is None:
                    raise NetworkError("the plugin config no longer names this bridge")
                forwarder.prepare_bridge(bridge_net.bridge, bridge_net.subnet)
                repaired.append(
                    f"guard rules of bridge {record.bridge} restored (guests could reach the "
                    "host's 127.0.0.1 without them)"
                )
        except NetworkError as exc:
            if self._close_route_localnet(record.bridge, netns):
                log.warning("bridge %s: guard rules not restored: %s", record.bridge, exc)
                repaired.append(
                    f"guard rules of bridge {record.bridge} could not be checked or put back "
                    f"({exc}); route_localnet turned off on it, so guests cannot reach the "
                    "host's 127.0.0.1 (nor do port forwards from it)"
                )
        if record.address:
            try:
                had = forwarder.set_guest_guard(
                    record.owner, record.tap, record.guest_mac, IPv4Address(record.address)
                )
            except NetworkError as exc:
                log.warning("%s: guest guard not restored: %s", record.tap, exc)
                repaired.append(f"guest guard on {record.tap} could not be checked: {exc}")
            else:
                if not had:
                    repaired.append(f"guest guard on {record.tap} restored")
        return repaired

    def _close_route_localnet(self, bridge: str, netns: str | None) -> bool:
        """Turn route_localnet off on ``bridge`` if it is on; whether it was."""
        if not links.link_exists(bridge, netns=netns):
            return False
        if sysctl.read(sysctl.route_localnet_key(bridge), netns=netns) != "1":
            return False
        sysctl.set_route_localnet(bridge, False, netns=netns)
        return True

    # -- blocking work, in a thread ----------------------------------------------------------

    def _setup(self, plan: NetworkPlan, record_network: RecordNetwork) -> NetworkAttachment:
        net, nic, netns = plan.net, plan.nic, plan.netns or None
        record = record_of(plan)
        if netns is not None and not netns_exists(netns):
            raise NetworkError(f"the allocation's network namespace {netns} does not exist")
        record_network(record)
        forwarder = self._forwarder(netns)
        try:
            self._prepare_bridge(net, vlan=nic.vlan is not None, netns=netns)
            address = self._pool(record, net).allocate(plan.owner, nic.static_ip)
            record = replace(record, address=str(address))
            record_network(record)
            forwards = [f for _, f in plan.forwards]
            forwarder.set_task_rules(plan.owner, plan.tap, plan.guest_mac, address, forwards)
            taps.create_tap(
                plan.tap, net.bridge, mac=tap_mac(plan.guest_mac), vlan=nic.vlan, netns=netns
            )
            if net.dnsmasq is not None:
                host = DhcpHost(
                    plan.guest_mac, address, plan.hostname, nic.gateway or net.gateway, nic.dns
                )
                self._dhcp(record, net).add(plan.owner, host)
        except BaseException:
            self._teardown(record, net)
            raise
        return NetworkAttachment(
            record=record,
            address=address,
            prefixlen=nic.prefixlen or net.subnet.prefixlen,
            gateway=nic.gateway or net.gateway,
            dns=nic.dns,
            port_map={label: f.guest_port for label, f in plan.forwards},
        )

    def _setup_macvtap(self, plan: MacvtapPlan, record_network: RecordNetwork) -> MacvtapAttachment:
        """Record, then create (the device was checked when the start was planned, and
        ``create_macvtap`` checks it again)."""
        nic = plan.nic
        record = macvtap_record(plan)
        record_network(record)
        try:
            mac = macvtap.create_macvtap(plan.name, nic.device, nic.mode, plan.guest_mac, FIELDS)
            if mac != record.guest_mac:  # passthrough: the device's own MAC
                record = replace(record, guest_mac=mac)
                record_network(record)
        except BaseException:
            self._teardown(record, None)
            raise
        return MacvtapAttachment(record, nic)

    def _dhcp(self, record: NetworkRecord, net: BridgeNetwork | None) -> DhcpServer:
        """The DHCP server of the record's bridge. Its binary comes from the plugin config,
        which may have turned DHCP off since: such a server can still be wound down."""
        if record.netns:
            net = group_network(net)
        if net is None or net.bridge != record.bridge:
            return DhcpServer(self.state_dir, record.bridge, None, None, record.netns or None)
        return DhcpServer(self.state_dir, net.bridge, net.subnet, net.dnsmasq, record.netns or None)

    def _forwarder(self, netns: str | None) -> PortForwarder:
        return self.forwarder if netns is None else PortForwarder(self.nft_table, netns=netns)

    def _pool(self, record: NetworkRecord, net: BridgeNetwork) -> AddressPool:
        """The bridge's leases; in group mode one pool per allocation namespace."""
        if not record.netns:
            return net.pool(self.state_dir)
        digest = hashlib.sha256(record.netns.encode()).hexdigest()[:24]
        path = self.state_dir / "group" / f"leases-{digest}.json"
        return AddressPool(path, net.subnet, net.gateway, net.pool_start, net.pool_end)

    def _prepare_bridge(self, net: BridgeNetwork, vlan: bool, netns: str | None = None) -> None:
        forwarder = self._forwarder(netns)
        if net.create_bridge:
            links.ensure_bridge(net.bridge, net.gateway_cidr, vlan_filtering=vlan, netns=netns)
        else:
            state = links.bridge_state(net.bridge)
            if not state.exists or not state.is_bridge:
                raise NetworkError(
                    f"bridge {net.bridge} does not exist on this host: create it, or set "
                    "create_bridge = true in the plugin's network block"
                )
        sysctl.enable_ip_forward(netns=netns)
        forwarder.prepare_bridge(net.bridge, net.subnet)
        if net.nat:
            forwarder.enable_nat(net.subnet, net.bridge)
        else:
            forwarder.disable_nat(net.bridge)

    def _teardown(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        if record.is_macvtap:
            # Deleting the link is all: the device it sat on is as it was (passthrough set
            # no MAC on it, and its promiscuity goes with the link).
            try:
                links.delete_link(record.tap)
            except NetworkError as exc:
                raise NetworkError(
                    f"network teardown incomplete (macvtap {record.tap}: {exc})"
                ) from exc
            return
        failures = []
        netns = record.netns or None
        steps: list[tuple[str, Any]] = [
            ("DHCP host", lambda: self._dhcp(record, net).remove(record.owner))
        ]
        # A group namespace that is gone took the TAP and the rules with it.
        if netns is None or netns_exists(netns):
            forwarder = self._forwarder(netns)
            steps += [
                ("port forwards and guest guard", lambda: forwarder.remove_rules(record.owner)),
                (f"TAP {record.tap}", lambda: links.delete_link(record.tap, netns=netns)),
            ]
        steps.append(("address lease", lambda: self._release(record, net)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep going: remove as much as possible
                failures.append(f"{what}: {exc}")
        if failures:
            # The journal keeps the record, so a later DestroyTask can try again.
            raise NetworkError(f"network teardown incomplete ({'; '.join(failures)})")

    def _release(self, record: NetworkRecord, net: BridgeNetwork | None) -> None:
        if record.netns:
            pool = self._pool(record, group_network())
            pool.release(record.owner)
            pool.discard_if_empty()  # the last VM of the allocation: no file left behind
            return
        if net is None or net.bridge != record.bridge:
            if record.address:
                log.warning("cannot release %s: the plugin no longer has its bridge", record)
            return
        net.pool(self.state_dir).release(record.owner)


def record_of(plan: NetworkPlan | MacvtapPlan) -> NetworkRecord:
    """What the journal records before any network step: everything but the address, all
    derived from the task id and the plugin's bridge (or the macvtap's device)."""
    if isinstance(plan, MacvtapPlan):
        return macvtap_record(plan)
    return NetworkRecord(plan.owner, plan.net.bridge, plan.tap, plan.guest_mac, netns=plan.netns)

"""DHCP mode through the real plugin, for guests without cloud-init.

The tiny guest has no disk and so no cloud-init seed; with ``nomadvm.dhcp=1`` its /init runs
busybox ``udhcpc`` on eth0 and prints the lease on the console. The plugin (``network { dhcp =
true }``) runs dnsmasq on its bridge, inside the test's namespace like everything else here
(see test_vm_network.py for the topology and the ``host`` fixture).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.network.dhcp import DhcpServer
from nomad_vm.network.names import mac_address
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, drv, tiny_task
from tests.integration.test_vm_lifecycle import wait_until
from tests.integration.test_vm_network import (
    BRIDGE,
    GATEWAY,
    GUEST_PORT,
    SUBNET,
    NetHost,
    bridge_nic,
    collect_task_events,
    forward,
    host,
    network_block,
)
from tests.netns import http_get, pids_in

pytestmark = pytest.mark.integration
__all__ = ["host"]  # the fixture, used by name

BOOT_TIMEOUT = 180
# A name server for guests that name none: the bridge's own address, inside the test's
# namespace (nothing queries it here).
PLUGIN_DNS = GATEWAY


@dataclass
class DhcpVM:
    n: int
    cfg: driver_pb2.TaskConfig
    fifo: FifoReader
    host_port: int
    addr: str = ""

    def wait_for_lease(self) -> str:
        """The line the guest printed once udhcpc configured eth0."""
        # The plugin-level `dns` reaches a guest whose NIC names none (tiny-init writes it to
        # /etc/resolv.conf); seed 000's guests resolve names that way.
        line = f"dhcp eth0 {self.addr}/24 router {GATEWAY} dns {PLUGIN_DNS} hostname vm-{self.n}"
        if not self.fifo.wait_for(line.encode(), BOOT_TIMEOUT):
            console = self.fifo.data.decode(errors="replace")
            raise AssertionError(f"vm-{self.n} did not report {line!r}; console:\n{console}")
        return line


@contextlib.contextmanager
def dhcp_vms(net: NetHost, guest: Any, count: int) -> Iterator[list[DhcpVM]]:
    """Tiny guests that take their address by DHCP and serve ``vm-<n>`` with busybox httpd
    on GUEST_PORT, forwarded from host port 20090+n."""
    assert net.plugin is not None
    with contextlib.ExitStack() as stack:
        vms = []
        for n in range(1, count + 1):
            serve = (
                f"mkdir /www && echo vm-{n} >/www/index.html && httpd -f -p {GUEST_PORT} -h /www"
            )
            cfg, fifo, _ = stack.enter_context(
                tiny_task(
                    net.plugin,
                    net.root,
                    guest,
                    alloc_name=f"dhcp{n}",
                    overrides={
                        "network_interface": bridge_nic(("http",)),
                        "share_task_dirs": False,
                        "hostname": f"vm-{n}",
                        "cmdline": tiny_cmdline(f"{guest.cmdline} nomadvm.dhcp=1", serve),
                    },
                    plugin_options={"network": network_block(dhcp=True), "dns": [PLUGIN_DNS]},
                )
            )
            forward(cfg, "http", 20090 + n, GUEST_PORT)
            vms.append(DhcpVM(n, cfg, fifo, 20090 + n))
        yield vms


def dhcp_server(net: NetHost) -> DhcpServer:
    """A view of the plugin's server, for observing it (without a binary it cannot start one)."""
    return DhcpServer(net.network_dir, BRIDGE, IPv4Network(SUBNET), None)


def test_guests_without_cloud_init_get_the_planned_addresses_by_dhcp(
    host: NetHost, tiny_guest: Any
) -> None:
    assert host.plugin is not None
    stream, events = collect_task_events(host.plugin)
    try:
        with dhcp_vms(host, tiny_guest, 2) as vms:
            for vm in vms:
                vm.addr = host.start(vm.cfg).network_override.addr
            server = dhcp_server(host)
            daemon = server.running()
            assert daemon is not None and daemon.pid in pids_in(host.ns)

            for vm in vms:
                vm.wait_for_lease()
                # The guest starts httpd after it prints the lease.
                url, page = f"http://127.0.0.1:{vm.host_port}", f"vm-{vm.n}"
                assert wait_until(lambda u=url, p=page: http_get(host.ns, u) == p, 60), url
            assert server.leases() == {mac_address(vm.cfg.id): IPv4Address(vm.addr) for vm in vms}
            macs = {vm.cfg.id: mac_address(vm.cfg.id) for vm in vms}
            for vm in vms:
                wanted = f"Network: {vm.addr} on nvt"
                said = [m for t, m in events if t == vm.cfg.id and m.startswith(wanted)]
                assert said and said[0].endswith(f"served by DHCP to {macs[vm.cfg.id]}"), events

            # The first task goes: its MAC and lease go, the other guest keeps being served.
            host.destroy(vms[0].cfg.id)
            assert set(server.leases()) == {macs[vms[1].cfg.id]}
            assert server.running() is not None
            assert http_get(host.ns, f"http://127.0.0.1:{vms[1].host_port}") == "vm-2"
            host.destroy(vms[1].cfg.id)
            assert server.running() is None
            assert not [p for p in pids_in(host.ns) if p == daemon.pid]
    finally:
        stream.cancel()
    host.assert_clean()


def test_a_plugin_restart_finds_dnsmasq_and_recovery_restarts_a_dead_one(
    host: NetHost, tiny_guest: Any
) -> None:
    with dhcp_vms(host, tiny_guest, 1) as (vm,):
        reply = host.start(vm.cfg)
        vm.addr = reply.network_override.addr
        vm.wait_for_lease()
        server = dhcp_server(host)
        daemon = server.running()
        assert daemon is not None

        first = host.plugin
        assert first is not None and first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        assert server.running() == daemon, "dnsmasq must outlive the plugin, as QEMU does"
        os.kill(daemon.pid, signal.SIGKILL)  # and then it dies while no plugin runs

        second = host.start_plugin()
        host.configure([str(tiny_guest.vmlinux.parent)], dhcp=True)
        stream, events = collect_task_events(second)
        try:
            stored = driver_pb2.TaskHandle()
            stored.CopyFrom(reply.handle)
            stored.config.CopyFrom(vm.cfg)
            stored.config.msgpack_driver_config = b""
            drv(second).RecoverTask(driver_pb2.RecoverTaskRequest(handle=stored), timeout=30)
            restarted = server.running()
            assert restarted is not None and restarted != daemon
            said = "Network reconciled: DHCP server restarted"
            assert wait_until(lambda: (vm.cfg.id, said) in events, 10), events
        finally:
            stream.cancel()
        assert http_get(host.ns, f"http://127.0.0.1:{vm.host_port}") == "vm-1"
        host.destroy(vm.cfg.id)
        assert server.running() is None
    host.assert_clean()

"""macvtap with the Debian guest: the address reaches the guest through cloud-init's
network-config, DHCP from the wire side (``dhcp4``) or ``static_ip``, and the wire side reaches
both guests' HTTP servers. The static guest's `dns` is a name server on the wire side, which
the guest resolves a name through (the Debian image has ifupdown without resolvconf, so only
the seed's resolv.conf bootcmd makes that work). Topology and fixture: test_macvtap.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.network.names import mac_address
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, configure, debian_boot, task_config
from tests.integration.test_macvtap import GUEST_PORT, WIRE, WIRE_IP, Wire, macvtap_nic, wire
from tests.integration.test_vm_lifecycle import stop, wait, wait_until
from tests.netns import http_get

pytestmark = pytest.mark.integration
__all__ = ["wire"]  # the fixture, used by name

STATIC_IP = "10.97.0.20"
BOOT_TIMEOUT = 400
# What the wire side's name server answers for NAME.
NAME, NAME_ADDRESS = "seed.test", "10.97.0.7"


def debian_task(
    net: Wire, guest: Any, n: int, nic: dict[str, object], resolve: bool = False
) -> tuple[driver_pb2.TaskConfig, FifoReader]:
    """A Debian task serving ``vm-<n>`` over HTTP on GUEST_PORT; READY-<n> on its console
    (after RESOLVED-<n> and what NAME resolves to, with ``resolve``: only a guest given a
    name server may ask, or it would wait for one that is not there)."""
    alloc = net.root / f"deb{n}"
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    serve = (
        f"mkdir -p /srv/www && echo vm-{n} > /srv/www/index.html && "
        f"setsid nohup python3 -m http.server {GUEST_PORT} --directory /srv/www "
        ">/dev/null 2>&1 &"
    )
    config = {
        **debian_boot(guest),
        "hostname": f"vm-{n}",
        "share_task_dirs": False,
        "cmds": [
            serve,
            *([f'echo "RESOLVED-{n} $(getent hosts {NAME})" > /dev/ttyS0'] if resolve else []),
            f"echo READY-{n} > /dev/ttyS0",
        ],
        "network_interface": nic,
    }
    cfg = task_config(alloc, config, task_id=f"alloc/tiny/deb{n}")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    return cfg, fifo


def leased_to(leases: Path, mac: str) -> str:
    """The address dnsmasq's lease file gives ``mac`` ("expiry mac ip name id" lines)."""
    if not leases.exists():
        return ""
    for line in leases.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == mac:
            return fields[2]
    return ""


def test_cloud_init_configures_dhcp_or_the_static_address_on_a_macvtap(
    wire: Wire, debian_guest: Any
) -> None:
    configure(wire.plugin, wire.root / "data", [str(debian_guest.disk.parent)])
    static_nic = macvtap_nic(static_ip=STATIC_IP, netmask="24", gateway=WIRE_IP, dns=[WIRE_IP])
    # A name server on the wire side only (the DHCP one there serves no DNS).
    name_server = subprocess.Popen(
        ["ip", "netns", "exec", wire.wire, "/usr/sbin/dnsmasq", "--keep-in-foreground",
         "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--user=root",
         f"--interface={WIRE}", "--bind-interfaces", "--pid-file=",
         f"--address=/{NAME}/{NAME_ADDRESS}"],
    )  # fmt: skip
    wire.spaces.procs.append(name_server)  # ended by the namespaces' cleanup
    dhcp_cfg, dhcp_fifo = debian_task(wire, debian_guest, 1, macvtap_nic())
    static_cfg, static_fifo = debian_task(wire, debian_guest, 2, static_nic, resolve=True)
    try:
        # Both boot at once: a Debian boot under TCG takes minutes.
        assert not wire.start(dhcp_cfg).HasField("network_override")
        override = wire.start(static_cfg).network_override
        assert (override.addr, dict(override.port_map)) == (STATIC_IP, {})
        for n, fifo in ((1, dhcp_fifo), (2, static_fifo)):
            ready = fifo.wait_for(f"READY-{n}".encode(), BOOT_TIMEOUT)
            assert ready, fifo.data.decode(errors="replace")[-3000:]

        leases = wire.root / "wire.leases"
        address = leased_to(leases, mac_address(dhcp_cfg.id))
        assert address, leases.read_text() if leases.exists() else "no lease file"
        for addr, body in ((address, "vm-1"), (STATIC_IP, "vm-2")):
            url = f"http://{addr}:{GUEST_PORT}/"
            assert wait_until(lambda url=url, body=body: http_get(wire.wire, url, 3) == body, 120)
        # The static guest resolves through its `dns`.
        console = static_fifo.data.decode(errors="replace")
        said = [line for line in console.splitlines() if "RESOLVED-2" in line]
        assert said and said[0].startswith(f"RESOLVED-2 {NAME_ADDRESS}"), said or console[-3000:]
        # The static guest asked nobody for an address.
        assert leased_to(leases, mac_address(static_cfg.id)) == ""

        for cfg in (dhcp_cfg, static_cfg):
            stop(wire.plugin, cfg.id, 60)
            wait(wire.plugin, cfg.id, 120)
            wire.destroy(cfg.id)
    finally:
        dhcp_fifo.close()
        static_fifo.close()
    wire.assert_clean()

"""`nomad-vm vm info` shows a VM's NIC: its TAP on the bridge, the guest's address, and I/O
counters that follow the traffic the test sends to it (all inside the test's own namespace,
where the plugin runs; see test_vm_network.py)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from nomad_vm.network.names import tap_name
from tests.conftest import wait_until
from tests.integration import test_vm_network as vmnet
from tests.integration.test_control_socket import vm_json
from tests.integration.test_vm_network import BRIDGE, TAP_PREFIX, NetHost, tiny_vms

pytestmark = pytest.mark.integration

# The namespace fixture with the plugin in it.
host = vmnet.host


def test_info_shows_the_nic_address_and_counters_that_follow_traffic(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    with tiny_vms(host, tiny_guest) as vms:
        task = vms.task("nic")
        addr = host.start(task).network_override.addr
        before = vm_json(host.data_dir, "info", task.id)
        (nic,) = before["nics"]
        assert nic["host_link"] == tap_name(TAP_PREFIX, task.id) and nic["bridge"] == BRIDGE
        assert nic["address"].split("/")[0] == addr and nic["kind"] == "bridge"
        assert before["problems"] == [], before["problems"]
        # Datagrams to the guest's address from the bridge's side: at least the ARP requests
        # for it reach the TAP, whether or not the guest's network is up yet.
        send = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(3): s.sendto(b'x' * 1000, (sys.argv[1], 9))\n"
        )
        subprocess.run(["ip", "netns", "exec", host.ns, "python3", "-c", send, addr], check=True)

        def grew() -> bool:
            after = vm_json(host.data_dir, "info", task.id)["nics"][0]
            seen.append(after)
            return bool(after["guest_rx_bytes"] > nic["guest_rx_bytes"])

        seen: list[dict[str, Any]] = []
        assert wait_until(grew, 10, every=0.5), (nic, seen[-1:])
        host.destroy(task.id)
    host.assert_clean()

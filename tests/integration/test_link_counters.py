"""A link's counters read over netlink inside a network namespace (the operator view's NIC
I/O): traffic on the loopback of a namespace the test creates; the counters follow."""

from __future__ import annotations

import subprocess

from nomad_vm.network.counters import link_counters
from tests.netns import isolated_namespaces


def test_counters_of_a_link_in_a_namespace_follow_its_traffic() -> None:
    with isolated_namespaces(("nvc",), prefix="nvc") as spaces:
        name = spaces.new()
        before = link_counters("lo", netns=name)
        assert before is not None
        send = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(3): s.sendto(b'x' * 1000, ('127.0.0.1', 9))\n"
        )
        subprocess.run(["ip", "netns", "exec", name, "python3", "-c", send], check=True)
        after = link_counters("lo", netns=name)
        assert after is not None
        # Three datagrams of 1000 bytes, sent and received on lo (and the port-unreachable
        # replies, as nothing listens).
        assert after["tx_packets"] - before["tx_packets"] >= 3
        assert after["rx_bytes"] - before["rx_bytes"] >= 3000
        assert link_counters("nvc-absent", netns=name) is None

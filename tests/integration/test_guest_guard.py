"""A guest may only send from its own MAC and address (issue 10, least privilege), proved with
two real tiny guests on the plugin's bridge, through the real plugin process, inside a
throwaway namespace (the ``host`` fixture of test_vm_network.py).

Guest B (10.99.0.11) pings the host, the legitimate traffic. Guest A (10.99.0.10) then attacks,
with busybox, and ends with a legitimate ping of its own:

1. takes B's address: pings the host from it, announces it by ARP (gratuitous, and as the
   sender of a request);
2. takes the host's address: pings B from it, announces it by ARP;
3. takes B's MAC: pings the host with it;
4. sends IPv6 (the plugin gives no IPv6 addresses; router advertisements from a guest would
   otherwise reach its neighbours);
5. pings the host from its own MAC and address: the marker.

A packet capture in the host's namespace watches the bridge (what reaches the host) and B's
TAP (what reaches B). None of 1-4 may arrive anywhere; B's and A's legitimate pings and their
replies must. (Without the guard, every kind arrives: the spoofed pings at the host and at B,
the ARP claims, the forged MAC, IPv6, and even A's replies, as the host, to B's pings.)

And RecoverTask re-asserts what keeps guests in their place when the plugin was not there to
see it removed (``nft flush ruleset``): the bridge's loopback guard (its route_localnet would
otherwise let guests reach the host's 127.0.0.1) and each guest's guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nomad_vm.network import links, sysctl
from nomad_vm.network.names import mac_address, tap_name
from nomad_vm.network.nft import BRIDGE_FAMILY, FAMILY
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, drv, tiny_task
from tests.integration.test_vm_lifecycle import wait_until
from tests.integration.test_vm_network import (
    BRIDGE,
    GATEWAY,
    TAP_PREFIX,
    NetHost,
    bridge_nic,
    collect_task_events,
    host,
    network_block,
)

pytestmark = pytest.mark.integration
__all__ = ["host"]  # the fixture, used by name

A_IP, B_IP = "10.99.0.10", "10.99.0.11"
TASK_PREFIX = "a1b2c3d4-0000-0000-0000-000000000001/tiny/"  # pluginkit.tiny_task's task ids
LEGIT_B, SPOOF_B_IP, SPOOF_HOST_IP, SPOOF_B_MAC, MARKER = 222, 301, 302, 303, 304
ATTACK_TIMEOUT = 300

# Records every ARP, IPv4 and IPv6 frame on the given interfaces as a JSON line; "ready" once
# listening, "done" (and exit) once the marker (an ICMP echo request with MARKER payload bytes
# from A) has reached the host, after reading whatever else had arrived by then.
CAPTURE = r"""
import json, select, socket, struct, sys
marker_mac, marker_ip, marker_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
socks = {}
for name in sys.argv[4:]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((name, 0))
    s.setblocking(False)
    socks[s] = name
def mac(b): return ":".join(f"{x:02x}" for x in b)
def describe(name, frame, pkttype):
    kind = struct.unpack("!H", frame[12:14])[0]
    seen = {"dev": name, "out": pkttype == 4, "src": mac(frame[6:12]), "dst": mac(frame[0:6]),
            "type": f"{kind:04x}"}
    if kind == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        seen |= {"ip_src": socket.inet_ntoa(frame[26:30]),
                 "ip_dst": socket.inet_ntoa(frame[30:34]), "proto": frame[23]}
        if frame[23] == 1:
            seen |= {"icmp_type": frame[14 + ihl], "icmp_len": total - ihl - 8}
    elif kind == 0x0806:
        seen |= {"arp_op": struct.unpack("!H", frame[20:22])[0], "arp_sha": mac(frame[22:28]),
                 "arp_spa": socket.inet_ntoa(frame[28:32]),
                 "arp_tpa": socket.inet_ntoa(frame[38:42])}
    elif kind != 0x86DD:
        return None
    return seen
def drain():
    found = False
    for s, name in socks.items():
        while True:
            try:
                frame, addr = s.recvfrom(65535)
            except BlockingIOError:
                break
            seen = describe(name, frame, addr[2])
            if seen is None:
                continue
            print(json.dumps(seen), flush=True)
            if (not seen["out"] and seen["src"] == marker_mac and seen.get("ip_src") == marker_ip
                    and seen.get("icmp_type") == 8 and seen.get("icmp_len") == marker_len):
                found = True
    return found
print("ready", flush=True)
while True:
    select.select(list(socks), [], [])
    if drain():
        drain()
        print("done", flush=True)
        break
"""


def attack(bridge_mac: str, a_mac: str, b_mac: str) -> str:
    """Guest A's shell script (busybox), steps 1-5 of the module docstring."""
    return f"""
ip link set eth0 up
# 1. B's address
ip addr add {B_IP}/24 dev eth0
arp -i eth0 -s {GATEWAY} {bridge_mac}
ping -c 2 -s {SPOOF_B_IP} -w 3 {GATEWAY}
arping -U -c 2 -w 2 -I eth0 {B_IP}
arping -c 2 -w 2 -I eth0 -s {B_IP} {GATEWAY}
ip addr flush dev eth0
# 2. the host's address, towards B
ip addr add {GATEWAY}/24 dev eth0
arp -i eth0 -s {B_IP} {b_mac}
ping -c 2 -s {SPOOF_HOST_IP} -w 3 {B_IP}
arping -U -c 2 -w 2 -I eth0 {GATEWAY}
ip addr flush dev eth0
# 3. B's MAC, A's own address
ip link set eth0 down
ip link set eth0 address {b_mac}
ip link set eth0 up
ip addr add {A_IP}/24 dev eth0
arp -i eth0 -s {GATEWAY} {bridge_mac}
ping -c 2 -s {SPOOF_B_MAC} -w 3 {GATEWAY}
ip link set eth0 down
ip link set eth0 address {a_mac}
ip link set eth0 up
# 4. IPv6
ping6 -c 2 -w 3 -I eth0 ff02::1
# 5. legitimate
ip addr replace {A_IP}/24 dev eth0
arp -i eth0 -s {GATEWAY} {bridge_mac}
ping -c 3 -s {MARKER} -w 20 {GATEWAY}
"""


VICTIM = f"""
ip link set eth0 up
ip addr add {B_IP}/24 dev eth0
ping -s {LEGIT_B} {GATEWAY} >/dev/null
"""


def lines_until(proc: subprocess.Popen[str], stop: Any, timeout: float) -> Iterator[dict[str, Any]]:
    """The capture's records as they come, until ``stop(record)`` or "done"; AssertionError
    when neither arrives within ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"nothing awaited from the capture within {timeout:.0f} s")
        line = proc.stdout.readline()
        if line.strip() == "done" or not line:
            return
        record = json.loads(line)
        yield record
        if stop(record):
            return


def neighbour(ns: str, address: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "neigh", "show", address, "dev", BRIDGE],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    entries = json.loads(out.stdout or "[]")
    return str(entries[0].get("lladdr", "")) if entries else ""


def test_a_guest_cannot_send_from_a_neighbours_address_or_mac(
    host: NetHost, tiny_guest: Any
) -> None:
    assert host.plugin is not None
    plugin = host.plugin
    a_id, b_id = TASK_PREFIX + "attacker", TASK_PREFIX + "victim"
    a_mac, b_mac = mac_address(a_id), mac_address(b_id)
    b_tap = tap_name(TAP_PREFIX, b_id)

    with contextlib.ExitStack() as stack:

        def start(name: str, address: str, script: str) -> FifoReader:
            cfg, fifo, _ = stack.enter_context(
                tiny_task(
                    plugin,
                    host.root,
                    tiny_guest,
                    alloc_name=name,
                    run=script,
                    overrides={
                        "network_interface": bridge_nic(static_ip=address),
                        "share_task_dirs": False,
                    },
                    plugin_options={"network": network_block()},
                )
            )
            assert cfg.id == TASK_PREFIX + name
            host.start(cfg)
            return fifo

        b_fifo = start("victim", B_IP, VICTIM)
        bridge_mac = links.bridge_state(BRIDGE, netns=host.ns).mac
        assert bridge_mac
        capture = host.spaces.spawn(host.ns, CAPTURE, a_mac, A_IP, str(MARKER), BRIDGE, b_tap)

        def b_answered(r: dict[str, Any]) -> bool:
            return bool(r["dev"] == b_tap and r["out"] and r.get("icmp_type") == 0)

        seen = list(lines_until(capture, b_answered, 180))
        assert any(
            r["dev"] == BRIDGE
            and r["src"] == b_mac
            and r.get("ip_src") == B_IP
            and r.get("icmp_len") == LEGIT_B
            for r in seen
        ), ("B's pings did not reach the host", seen[-20:], bytes(b_fifo.data[-2000:]))
        assert neighbour(host.ns, B_IP) == b_mac

        a_fifo = start("attacker", A_IP, attack(bridge_mac, a_mac, b_mac))
        seen += list(lines_until(capture, lambda r: False, ATTACK_TIMEOUT))
        assert a_fifo.wait_for(b"command exited with status", 60), bytes(a_fifo.data[-3000:])

    # What reached the host (received on the bridge) or guest B (sent out of its TAP); the
    # capture on B's TAP also sees B's own frames before the bridge filters them.
    arrived = [
        r for r in seen if (r["dev"] == BRIDGE and not r["out"]) or (r["dev"] == b_tap and r["out"])
    ]
    spoofed = [
        r
        for r in arrived
        if (r["src"] == a_mac and r.get("ip_src", A_IP) != A_IP)
        or (r.get("arp_sha") == a_mac and r.get("arp_spa") not in (A_IP, "0.0.0.0"))
        or (r["src"] != a_mac and A_IP in (r.get("ip_src"), r.get("arp_spa")))
        or r.get("icmp_len") in (SPOOF_B_IP, SPOOF_HOST_IP, SPOOF_B_MAC)
        or (r["type"] == "86dd" and r["src"] in (a_mac, b_mac))
    ]
    assert not spoofed, (
        f"{len(spoofed)} spoofed frames arrived (dev {BRIDGE}: at the host, {b_tap}: at B)",
        spoofed[:20],
    )
    assert neighbour(host.ns, B_IP) == b_mac, "the host takes someone else for B"
    # The legitimate traffic flowed both ways: A's marker (the capture ended on it) and the
    # host's replies, to B (captured) and to A (busybox ping prints the reply's size).
    assert any(r["dev"] == b_tap and r["out"] and r.get("icmp_type") == 0 for r in seen)
    answered = f"{MARKER + 8} bytes from {GATEWAY}".encode()
    assert answered in a_fifo.data, bytes(a_fifo.data[-3000:])
    for task_id in (TASK_PREFIX + "attacker", b_id):
        host.destroy(task_id)
    host.assert_clean()


def flush_ruleset(ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True, timeout=30)


def test_recovery_reasserts_the_loopback_guard_and_the_guest_guard(
    host: NetHost, tiny_guest: Any
) -> None:
    """The plugin dies; meanwhile someone flushes the namespace's nftables ruleset, leaving
    route_localnet on with nothing guarding it. RecoverTask puts both guards back, says so in
    task events, and the task is still torn down completely."""
    assert host.plugin is not None
    with tiny_task(
        host.plugin,
        host.root,
        tiny_guest,
        alloc_name="recovered",
        overrides={"network_interface": bridge_nic(), "share_task_dirs": False},
        plugin_options={"network": network_block()},
    ) as (cfg, _, _):
        reply = host.start(cfg)
        guard_before = host.nft.rules(cfg.id, family=BRIDGE_FAMILY)
        assert guard_before, "no guest guard"
        assert host.nft.has_loopback_guard(BRIDGE)

        first = host.plugin
        assert first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        flush_ruleset(host.ns)
        assert not host.nft.has_loopback_guard(BRIDGE) and not host.nft.rules(cfg.id)
        key = f"net/ipv4/conf/{BRIDGE}/route_localnet"
        assert sysctl.read(key, netns=host.ns) == "1"  # the hole, open

        second = host.start_plugin()
        host.configure([str(tiny_guest.vmlinux.parent)])
        stream, events = collect_task_events(second)
        try:
            stored = driver_pb2.TaskHandle()
            stored.CopyFrom(reply.handle)
            stored.config.CopyFrom(cfg)
            stored.config.msgpack_driver_config = b""
            drv(second).RecoverTask(driver_pb2.RecoverTaskRequest(handle=stored), timeout=30)
            assert host.nft.has_loopback_guard(BRIDGE)
            assert sysctl.read(key, netns=host.ns) == "1"
            after = host.nft.rules(cfg.id, family=BRIDGE_FAMILY)
            assert [r.expr for r in after] == [r.expr for r in guard_before]
            assert not host.nft.rules(cfg.id, family=FAMILY)  # the forwards: none were asked

            def said(words: str) -> bool:
                return any(t == cfg.id and words in m for t, m in events)

            assert wait_until(
                lambda: said("guard rules of bridge") and said("guest guard on"), 10
            ), events
        finally:
            stream.cancel()
        host.destroy(cfg.id)
    host.assert_clean()
    assert os.path.exists(host.lease_file)

"""Run *inside the Debian test guest* (python3 vlan_probe.py PYTHONPATH_DIR) by
test_vlan_in_guest.py: the driver's VLAN code against a kernel that has bridge VLAN filtering.

It makes a VLAN-filtering bridge and four TAPs with ``nomad_vm.network`` exactly as the driver
does on a host (``ensure_bridge(vlan_filtering=True)``, ``create_tap(vlan=...)``), attaches to
each TAP the way QEMU does (``open_tap``: a descriptor with virtio-net headers), and sends an
Ethernet broadcast into one of them, as a guest would. It prints one JSON object: which TAPs
received the frame, whether it arrived untagged, and each port's VLANs as the kernel reports
them. Everything it creates lives in a network namespace of its own, deleted at the end.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

sys.path.insert(0, sys.argv[1])

from nomad_vm.network import links, taps

NS = "vlanprobe"
BRIDGE = "vbr0"
# name -> VLAN (None: no VLAN setting, the bridge's default VLAN 1)
PORTS = {"tapa": 10, "tapb": 10, "tapc": 20, "tapd": None}
ETHERTYPE = 0x88B5  # IEEE 802 local experimental
VNET_HDR = bytes(10)  # struct virtio_net_hdr, all zero: no offloads
SENDER_MAC = bytes.fromhex("525400000a0a")


def frame(marker: bytes) -> bytes:
    return VNET_HDR + b"\xff" * 6 + SENDER_MAC + ETHERTYPE.to_bytes(2, "big") + marker.ljust(46)


def received(fd: int, marker: bytes, seconds: float) -> dict[str, object] | None:
    """The first frame carrying ``marker`` read from ``fd`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        data = os.read(fd, 65536)[len(VNET_HDR) :]
        if marker in data:
            return {"untagged": int.from_bytes(data[12:14], "big") == ETHERTYPE}
    return None


def main() -> None:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    netns = f"/run/netns/{NS}"
    fds: dict[str, int] = {}
    try:
        state = links.ensure_bridge(BRIDGE, None, vlan_filtering=True, netns=netns)
        for name, vlan in PORTS.items():
            taps.create_tap(name, BRIDGE, vlan=vlan, netns=netns)
            fds[name] = taps.open_tap(name, netns=netns)
        for fd in fds.values():
            os.set_blocking(fd, False)
        time.sleep(1)  # let the ports' carrier come up before sending
        results = {}
        for sender in ("tapa", "tapc"):
            marker = f"from-{sender}".encode()
            os.write(fds[sender], frame(marker))
            results[sender] = {
                name: received(fd, marker, 2.0) for name, fd in fds.items() if name != sender
            }
        vlans = {name: [vars(v) for v in taps.port_vlans(name, netns=netns)] for name in PORTS}
        print(json.dumps({"vlan_filtering": state.vlan_filtering, "sent": results,
                          "vlans": vlans}))  # fmt: skip
    finally:
        for fd in fds.values():
            os.close(fd)
        subprocess.run(["ip", "netns", "del", NS], check=False)


if __name__ == "__main__":
    main()

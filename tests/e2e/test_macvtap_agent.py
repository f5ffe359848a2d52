"""macvtap through the real Nomad agent: examples/macvtap-web.nomad.hcl, the virt seed's
``network_interface { macvtap { device, mode } }`` as written.

The agent (and so the plugin) runs in a namespace of the test's, where one end of a veth
(``nvtmlow``, no address) is the lower device; the other end is in a second namespace with an
address and a dnsmasq serving DHCP, the machine "at the other end of the wire" that reaches the
guest (see tests/integration/test_macvtap.py for the same topology without the agent).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO, wait_until
from tests.e2e.conftest import run_job, running_agent, wait_alloc
from tests.e2e.test_vm_network_agent import poll, task_events
from tests.netns import http_get, ip, isolated_namespaces

pytestmark = pytest.mark.e2e

JOB = REPO / "examples" / "macvtap-web.nomad.hcl"
JOB_NAME = "macvtap-web"
LOWER = "nvtmlow"
WIRE = "nvtmwire"


@dataclass
class Setup:
    agent: DevAgent
    host: str
    wire: str


def macvtaps(ns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-d", "-j", "link", "show"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return [
        link["ifname"]
        for link in json.loads(out.stdout)
        if link.get("linkinfo", {}).get("info_kind") == "macvtap"
    ]


@pytest.fixture
def setup(tiny_guest: Any) -> Iterator[Setup]:
    with isolated_namespaces(("nvm", "nvtm"), prefix="nve") as spaces:
        host, wire = spaces.new(), spaces.new()
        ip("-n", host, "link", "add", LOWER, "type", "veth", "peer", "name", WIRE, "netns", wire)
        ip("-n", host, "link", "set", LOWER, "up")
        ip("-n", wire, "addr", "add", "10.96.0.1/24", "dev", WIRE)
        ip("-n", wire, "link", "set", WIRE, "up")
        leases = Path(f"/tmp/{wire}.leases")
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", wire, "/usr/sbin/dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0", "--user=root",
             f"--interface={WIRE}", "--bind-interfaces", "--pid-file=",
             "--dhcp-range=10.96.0.50,10.96.0.99,255.255.255.0,1h",
             f"--dhcp-leasefile={leases}"],
            text=True,
        )  # fmt: skip
        spaces.procs.append(dnsmasq)  # ended by the namespaces' cleanup
        try:
            with running_agent([tiny_guest.vmlinux.parent], netns=host) as agent:
                yield Setup(agent, host, wire)
        finally:
            leases.unlink(missing_ok=True)


def test_the_seeds_macvtap_job_runs_and_its_guest_is_reached_from_the_wire(
    setup: Setup, tiny_guest: Any
) -> None:
    agent = setup.agent
    run_job(agent, JOB, kernel=tiny_guest.vmlinux, initramfs=tiny_guest.initramfs, device=LOWER)
    alloc = wait_alloc(agent, JOB_NAME, {"running"}, timeout=180)
    alloc_id = str(alloc["ID"])

    def network_event() -> list[str]:
        return [e for e in task_events(agent, alloc_id) if "Network: macvtap" in e]

    (event,) = poll("the driver's Network event", network_event, 30, every=1)
    assert f"on {LOWER} (mode bridge)" in event and "by DHCP" in event, event
    (link,) = macvtaps(setup.host)

    def lease() -> str:
        logs = agent.nomad("alloc", "logs", alloc_id, "vm")
        found = re.search(r"dhcp eth0 (10\.96\.0\.\d+)/24", logs)
        return found.group(1) if found else ""

    address = poll("the guest's DHCP lease", lease, 180, every=1)
    url = f"http://{address}:8080/"
    assert wait_until(lambda: http_get(setup.wire, url, 3) == "hello over macvtap", 60)

    agent.nomad("job", "stop", "-detach", JOB_NAME)
    wait_alloc(agent, JOB_NAME, {"complete"}, timeout=120)
    assert wait_until(lambda: macvtaps(setup.host) == [], 60), macvtaps(setup.host)
    assert link not in macvtaps(setup.host)

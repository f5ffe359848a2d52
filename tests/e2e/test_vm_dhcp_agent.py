"""DHCP mode through the real Nomad agent: examples/dhcp-web.nomad.hcl, a guest without
cloud-init, on a plugin bridge with ``dhcp = true``.

As in test_vm_network_agent.py the agent runs inside a private network namespace, so the
bridge, the TAP, dnsmasq and every address exist only there. The check passes only if the guest
configured the very address the driver planned (the port forward targets it), and the service
is registered with that address.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import psutil
import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO
from tests.e2e.conftest import private_netns, run_tiny_job, running_agent, wait_alloc
from tests.e2e.test_vm_network_agent import (
    BRIDGE,
    TAP_PREFIX,
    checks,
    http_get,
    owner_rules,
    poll,
    taps,
    task_events,
)
from tests.e2e.test_vm_network_agent import PLUGIN_NETWORK as BRIDGE_NETWORK

pytestmark = pytest.mark.e2e

JOB = REPO / "examples" / "dhcp-web.nomad.hcl"
JOB_NAME = "dhcp-web"
SUBNET = IPv4Network("10.95.0.0/24")
# The bridge of test_vm_network_agent.py, with DHCP on.
PLUGIN_NETWORK = {**BRIDGE_NETWORK, "subnet_cidr": str(SUBNET), "dhcp": True}


@pytest.fixture
def agent(tiny_guest: Any) -> Iterator[DevAgent]:
    with (
        private_netns((BRIDGE, TAP_PREFIX)) as netns,
        running_agent(
            [tiny_guest.vmlinux.parent], netns=netns, plugin_network=PLUGIN_NETWORK
        ) as agent,
    ):
        yield agent


def dnsmasqs(agent: DevAgent) -> list[psutil.Process]:
    """The plugin's dnsmasq processes (their files are under the agent's work dir)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.info["name"] == "dnsmasq" and str(agent.config.workdir) in cmdline:
            found.append(proc)
    return found


def test_a_guest_without_cloud_init_is_served_its_address_and_passes_its_check(
    agent: DevAgent, tiny_guest: Any
) -> None:
    netns = agent.config.netns
    assert netns
    run_tiny_job(agent, JOB, tiny_guest)
    alloc = wait_alloc(agent, JOB_NAME, {"running"}, timeout=180)
    alloc_id = str(alloc["ID"])
    shared = alloc["AllocatedResources"]["Shared"]  # type: ignore[index]
    (port,) = [p for p in shared["Ports"] if p["Label"] == "http"]
    host_port = int(port["Value"])

    def network_events() -> list[str]:
        return [e for e in task_events(agent, alloc_id) if e.startswith("Driver: Network: ")]

    (event,) = poll("the driver's Network event", network_events, 30, every=1)
    address = IPv4Address(event.removeprefix("Driver: Network: ").split()[0])
    assert address in SUBNET, event
    assert ", served by DHCP to 52:" in event, event
    # `nomad alloc status` shows it among the task's recent events.
    status = agent.nomad("alloc", "status", alloc_id)
    assert f"Network: {address} on {TAP_PREFIX}" in status, status
    assert len(dnsmasqs(agent)) == 1

    def registered() -> list[dict[str, Any]]:
        found = agent.api(f"/v1/service/{JOB_NAME}")
        assert isinstance(found, list)
        return found

    (reg,) = poll("service registration", registered, 60)
    assert (reg["Address"], reg["Port"]) == (str(address), 8080), reg

    def passing() -> list[dict[str, Any]]:
        return [c for c in checks(agent, alloc_id) if c["Status"] == "success"]

    try:
        poll("the service check passing", passing, 240, every=3)
    except TimeoutError as exc:
        logs = agent.nomad("alloc", "logs", alloc_id)[-2000:]
        pytest.fail(f"{exc}: checks {checks(agent, alloc_id)}; console:\n{logs}")
    logs = agent.nomad("alloc", "logs", alloc_id)
    assert f"dhcp eth0 {address}/24 router {SUBNET[1]} dns  hostname dhcp-web" in logs, logs
    assert http_get(netns, f"http://127.0.0.1:{host_port}/") == "200 hello over dhcp"

    agent.nomad("job", "stop", "-detach", JOB_NAME)
    wait_alloc(agent, JOB_NAME, {"complete"}, timeout=120)
    poll("TAP removed", lambda: not taps(netns), 60, every=1)
    poll("port forward rules removed", lambda: not owner_rules(netns), 30, every=1)
    poll("dnsmasq stopped with the last task", lambda: not dnsmasqs(agent), 30, every=1)

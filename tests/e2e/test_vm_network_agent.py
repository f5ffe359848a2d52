"""Bridge networking through the real Nomad agent: examples/web.nomad.hcl in a Debian VM.

The agent runs inside a network namespace of its own (``private_netns``), so the plugin's
bridge, the VM's TAP, every address and the nftables table ``ip nomad_vm`` exist only there;
the namespace is deleted afterwards and the host's own namespace is checked for leaks. The
agent's API is on that namespace's loopback, which ``DevAgent.api``/``nomad`` reach.

Topology inside the namespace::

    Nomad client, plugin (127.0.0.1, 10.97.0.1 on bridge nvebr0) --TAP nve...-- VM (10.97.0.x)

What the test checks: the service is registered with the VM's address and guest port (the
NetworkOverride of StartTask, through ``address_mode = "driver"``), Nomad's own HTTP check
passes (it goes to 127.0.0.1:<host port>, through the driver's port forward), the test reaches
the VM both ways, and after ``nomad job stop`` no TAP and no per-task rule is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import httpx
import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.errors import NetworkError
from nomad_vm.network import links
from nomad_vm.network.names import is_owner_tag
from nomad_vm.network.netns import run_in
from nomad_vm.network.nft import PortForwarder
from tests.conftest import REPO, vm_processes_under
from tests.e2e.conftest import private_netns, run_debian_job, running_agent, wait_alloc

pytestmark = pytest.mark.e2e

JOB = REPO / "examples" / "web.nomad.hcl"
JOB_NAME = "web-vm"
SERVICE = "web"
INDEX_TEXT = "hello from a nomad-vm guest"  # what the job's cmds write to index.html
GUEST_PORT = 8080
BRIDGE = "nvebr0"
TAP_PREFIX = "nve"
SUBNET = IPv4Network("10.97.0.0/24")
PLUGIN_NETWORK = {
    "bridge": BRIDGE,
    "subnet_cidr": str(SUBNET),
    "create_bridge": True,
    "tap_prefix": TAP_PREFIX,
}
# Debian boots in 60-90 s under TCG on an idle machine; this one has 2 cores, shared.
CHECK_TIMEOUT = 360.0
_T = TypeVar("_T")


@pytest.fixture
def netns() -> Iterator[str]:
    with private_netns((BRIDGE, TAP_PREFIX)) as name:
        yield name


@pytest.fixture
def web_agent(netns: str, debian_guest: Any) -> Iterator[DevAgent]:
    with running_agent(
        [debian_guest.disk.parent], netns=netns, plugin_network=PLUGIN_NETWORK
    ) as agent:
        yield agent


def poll(what: str, fn: Callable[[], _T | None], timeout: float, every: float = 2.0) -> _T:
    """``fn()``'s first truthy result within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


def http_get(netns: str, url: str) -> str:
    """``<status> <body>`` of a GET from inside ``netns``, or ``error <exception>``."""

    def get() -> str:
        try:
            reply = httpx.get(url, timeout=5.0)
        except httpx.HTTPError as exc:
            return f"error {type(exc).__name__}: {exc}"
        return f"{reply.status_code} {reply.text.strip()}"

    return run_in(netns, get)


def task_events(agent: DevAgent, alloc_id: str) -> list[str]:
    alloc = agent.api(f"/v1/allocation/{alloc_id}")
    assert isinstance(alloc, dict)
    state = (alloc.get("TaskStates") or {}).get("vm") or {}
    return [f"{e['Type']}: {e['DisplayMessage']}" for e in state.get("Events") or []]


def checks(agent: DevAgent, alloc_id: str) -> list[dict[str, Any]]:
    """The allocation's Nomad-provider check results (``/v1/allocation/<id>/checks``)."""
    found = agent.api(f"/v1/allocation/{alloc_id}/checks")
    assert isinstance(found, dict)
    return list(found.values())


def registrations(agent: DevAgent) -> list[dict[str, Any]]:
    found = agent.api(f"/v1/service/{SERVICE}")
    assert isinstance(found, list)
    return found


def taps(netns: str) -> list[str]:
    """The bridge's ports; none while the bridge does not exist."""
    try:
        return links.bridge_ports(BRIDGE, netns=netns)
    except NetworkError:
        if links.link_exists(BRIDGE, netns=netns):
            raise
        return []


def owner_rules(netns: str) -> list[str]:
    """Comments of per-task rules in table nomad_vm (the bridge's own rules aside)."""
    rules = PortForwarder(netns=netns).rules()
    return sorted(r.comment for r in rules if r.comment and is_owner_tag(r.comment))


def test_service_check_on_the_vm_address_becomes_healthy(
    web_agent: DevAgent, netns: str, debian_guest: Any
) -> None:
    agent = web_agent
    run_debian_job(agent, JOB, debian_guest)
    alloc = wait_alloc(agent, JOB_NAME, {"running"}, timeout=300)
    alloc_id = str(alloc["ID"])

    # The host port Nomad allocated for "http", on the node's address (loopback here).
    shared = alloc["AllocatedResources"]["Shared"]  # type: ignore[index]
    (port,) = [p for p in shared["Ports"] if p["Label"] == "http"]
    assert port["To"] == GUEST_PORT, port
    host_port = int(port["Value"])

    # Nomad's API shows the NetworkOverride nowhere in the allocation (NetworkStatus is for
    # group network modes and stays empty): the driver's own event names address and TAP.
    (tap,) = taps(netns)
    assert tap.startswith(TAP_PREFIX), tap

    def network_events() -> list[str]:
        return [e for e in task_events(agent, alloc_id) if e.startswith("Driver: Network: ")]

    (network_event,) = poll("the driver's Network event", network_events, 30, every=1)
    address, on, event_tap = network_event.removeprefix("Driver: Network: ").split()
    vm_ip = IPv4Address(address)
    assert vm_ip in SUBNET and vm_ip != SUBNET[1], network_event
    assert (on, event_tap) == ("on", tap), network_event
    # `nomad alloc status` shows the address among the task's recent events.
    status = agent.nomad("alloc", "status", alloc_id)
    assert f"Network: {vm_ip} on {tap}" in status, status
    assert owner_rules(netns), "no port forward rules for the task"

    # The service carries the VM's address and the guest port: StartTask's NetworkOverride,
    # which address_mode = "driver" selects.
    (reg,) = poll("service registration", lambda: registrations(agent), 60)
    assert (reg["Address"], reg["Port"]) == (str(vm_ip), GUEST_PORT), reg
    assert reg["AllocID"] == alloc_id, reg

    # Nomad's HTTP check. Nomad-provider checks cannot use address_mode = "driver" (the job is
    # rejected) and never see the driver network: it goes to the node's address and the host
    # port (127.0.0.1:<port> here), so it passes only through the driver's port forward.
    def check_passed() -> list[dict[str, Any]]:
        return [c for c in checks(agent, alloc_id) if c["Status"] == "success"]

    try:
        (result,) = poll("the service check passing", check_passed, CHECK_TIMEOUT, every=5)
    except TimeoutError as exc:
        pytest.fail(
            f"{exc}: checks {checks(agent, alloc_id)}; events {task_events(agent, alloc_id)}; "
            f"GET {http_get(netns, f'http://127.0.0.1:{host_port}/')}"
        )
    assert (result["Service"], result["StatusCode"]) == (SERVICE, 200), result

    # From the namespace: the forwarded host port, and the VM's own address.
    assert http_get(netns, f"http://127.0.0.1:{host_port}/") == f"200 {INDEX_TEXT}"
    assert http_get(netns, f"http://{vm_ip}:{GUEST_PORT}/") == f"200 {INDEX_TEXT}"

    agent.nomad("job", "stop", "-detach", JOB_NAME)
    wait_alloc(agent, JOB_NAME, {"complete"}, timeout=180)
    # DestroyTask may come a moment after the client status flips.
    poll("TAP removed", lambda: not taps(netns), 60, every=1)
    poll("port forward rules removed", lambda: not owner_rules(netns), 30, every=1)
    poll("VM processes gone", lambda: not vm_processes_under(agent.config.workdir), 30, every=1)
    poll("service deregistered", lambda: not registrations(agent), 60, every=1)

"""Nomad's group networking (`network { mode = "bridge" }`) for a VM task, through the real agent.

The agent runs inside a network namespace of its own (``private_netns``), so Nomad's CNI bridge
(``nomad``, 172.26.64.0/20), its iptables rules and the veth into the allocation's namespace
exist only there; the allocation's namespace is created by Nomad itself (``/var/run/netns/<alloc
id>``, a namespace of its own, not nested). The plugin has no bridge of its own configured: in
group mode the driver makes its bridge ``nvm0`` inside the allocation's namespace.

Topology::

    test namespace: agent, plugin, QEMU; bridge "nomad" 172.26.64.1
        --veth-- allocation namespace: eth0 172.26.64.x; nvm0 192.168.254.1/28
            --TAP (an fd QEMU inherited)-- VM 192.168.254.2:8080

A GET to 127.0.0.1:<host port> in the test namespace goes through Nomad's CNI portmap (to
<alloc address>:8080) and then through the driver's DNAT in the allocation's namespace (to the
VM). After `nomad job stop`: no QEMU, and the allocation's namespace is gone or holds nothing of
ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.driver.network_plan import GROUP_BRIDGE
from nomad_vm.errors import NetworkError
from nomad_vm.network import links
from nomad_vm.network.names import is_owner_tag
from nomad_vm.network.netns import netns_exists
from nomad_vm.network.nft import PortForwarder
from tests.conftest import vm_processes_under
from tests.e2e.conftest import (
    DEBIAN_VARIABLES,
    private_netns,
    run_debian_job,
    running_agent,
    wait_alloc,
)
from tests.e2e.test_vm_network_agent import http_get, poll, task_events

pytestmark = pytest.mark.e2e

CNI_PATH = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
JOB_NAME = "web-group"
INDEX_TEXT = "hello from a VM in the group network"
GUEST_PORT = 8080
BOOT_TIMEOUT = 360.0  # Debian under TCG on a shared 2-core machine

JOB = """
job "{job}" {{
  group "web" {{
    network {{
      mode = "bridge"
      port "http" {{
        to = {port}
      }}
    }}
    task "vm" {{
      driver = "vm"
      config {{
        image     = var.image
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = var.cmdline
        hostname  = "web-group"
        network_interface {{
          bridge {{
            ports = ["http"]
          }}
        }}
        cmds = [
          "mkdir -p /srv/www && echo '{text}' > /srv/www/index.html",
          "systemd-run --unit=web python3 -m http.server {port} --directory /srv/www",
        ]
      }}
      resources {{
        cpu    = 1000
        memory = 1024
      }}
      kill_timeout = "30s"
    }}
  }}
}}
"""


@pytest.fixture
def netns() -> Iterator[str]:
    assert (CNI_PATH / "bridge").exists(), (
        f"no CNI plugins in {CNI_PATH}: install containernetworking-plugins (make setup)"
    )
    # Nomad's bridge and veths, and the driver's, must never show up in the host's namespace.
    with private_netns(("nomad", "veth", GROUP_BRIDGE, "nvm")) as name:
        yield name


@pytest.fixture
def group_agent(netns: str, debian_guest: Any) -> Iterator[DevAgent]:
    with running_agent([debian_guest.disk.parent], netns=netns, cni_path=CNI_PATH) as agent:
        yield agent


def test_vm_in_the_allocation_namespace_serves_nomads_port_mapping(
    group_agent: DevAgent, netns: str, debian_guest: Any, tmp_path: Path
) -> None:
    agent = group_agent
    job = tmp_path / "group.nomad.hcl"
    job.write_text(DEBIAN_VARIABLES + JOB.format(job=JOB_NAME, port=GUEST_PORT, text=INDEX_TEXT))
    run_debian_job(agent, job, debian_guest)
    alloc = wait_alloc(agent, JOB_NAME, {"running", "failed"}, timeout=300)
    alloc_id = str(alloc["ID"])
    assert alloc["ClientStatus"] == "running", task_events(agent, alloc_id)

    shared = alloc["AllocatedResources"]["Shared"]  # type: ignore[index]
    (port,) = [p for p in shared["Ports"] if p["Label"] == "http"]
    assert port["To"] == GUEST_PORT, port
    host_port = int(port["Value"])
    # Nomad's view of the allocation's namespace (eth0 on its CNI bridge).
    status = alloc.get("NetworkStatus") or {}
    alloc_address = str(status.get("Address") or "")  # type: ignore[union-attr]
    print(f"NetworkStatus: {status}; host port {host_port}")

    # The driver's event names the namespace Nomad handed over (network_isolation_spec.path).
    def network_events() -> list[str]:
        return [e for e in task_events(agent, alloc_id) if e.startswith("Driver: Network: ")]

    (event,) = poll("the driver's Network event", network_events, 30, every=1)
    address, on, tap, in_, alloc_netns = event.removeprefix("Driver: Network: ").split()
    assert (address, on, in_) == ("192.168.254.2", "on", "in"), event
    assert alloc_netns.endswith(alloc_id), event
    assert netns_exists(alloc_netns)
    assert links.bridge_ports(GROUP_BRIDGE, netns=alloc_netns) == [tap]
    assert not links.link_exists(GROUP_BRIDGE, netns=netns), "the bridge belongs in the alloc"
    assert _owner_rules(alloc_netns), "no port forward in the allocation's namespace"

    url = f"http://127.0.0.1:{host_port}/"
    try:
        poll(
            "the VM answering on the host port",
            lambda: http_get(netns, url) == f"200 {INDEX_TEXT}",
            BOOT_TIMEOUT,
            every=5,
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}: GET {http_get(netns, url)}; events {task_events(agent, alloc_id)}")
    # The allocation's own address and the `to` port (address_mode = "alloc") reach it too.
    if alloc_address:
        got = http_get(netns, f"http://{alloc_address}:{GUEST_PORT}/")
        assert got == f"200 {INDEX_TEXT}", got

    agent.nomad("job", "stop", "-detach", JOB_NAME)
    wait_alloc(agent, JOB_NAME, {"complete"}, timeout=180)
    poll("VM processes gone", lambda: not vm_processes_under(agent.config.workdir), 60, every=1)

    def namespace_clean() -> bool:
        if not netns_exists(alloc_netns):
            return True
        try:
            has_bridge = links.link_exists(GROUP_BRIDGE, netns=alloc_netns)
            ports = links.bridge_ports(GROUP_BRIDGE, netns=alloc_netns) if has_bridge else []
            return not ports and not _owner_rules(alloc_netns)
        except NetworkError:
            # Nomad removed the namespace while we looked into it.
            if netns_exists(alloc_netns):
                raise
            return True

    poll("the allocation's namespace gone or clean", namespace_clean, 60, every=1)
    data = agent.config.workdir / "plugin-data"
    poll("no task journal left", lambda: not list(data.glob("journal/*")), 30, every=1)
    assert not list(data.glob("network/group/leases-*")), "the allocation's lease file stays"


def _owner_rules(alloc_netns: str) -> list[str]:
    rules = PortForwarder(netns=alloc_netns).rules()
    return sorted(r.comment for r in rules if r.comment and is_owner_tag(r.comment))

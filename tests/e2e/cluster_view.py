"""What really runs on the cluster bed's clients (processes, links, rules, files), and what
Nomad's server says should: the two views the cluster tests compare.

A client's VMs are the QEMU processes in its namespace; each holds descriptors of its
allocation's directory (``<client>/data/alloc/<alloc id>/...``), which names the allocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pyroute2 import IPRoute

from nomad_vm.cluster.agents import ClusterAgent
from nomad_vm.cluster.bed import TAP_PREFIX, ClusterBed, processes_in
from nomad_vm.network.names import is_owner_tag
from nomad_vm.network.netns import run_in
from tests.conftest import CGROUP_ROOT, task_state_in

_ALLOC_DIR = re.compile(r"/data/alloc/([0-9a-f-]{36})/")


@dataclass
class ClientView:
    name: str
    vms: dict[str, list[int]] = field(default_factory=dict)  # alloc id -> QEMU pids
    taps: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # per-task nftables rules' owner tags
    task_state: list[Path] = field(default_factory=list)  # in the plugin's data_dir
    leases: list[str] = field(default_factory=list)  # addresses leased on the bridge
    cgroups: set[Path] = field(default_factory=set)  # the plugin's, of the VMs seen

    def leftovers(self, alloc_ids: set[str] | None = None) -> dict[str, object]:
        """What of the task(s) is still here: everything of the client when ``alloc_ids`` is
        None, else only the VMs of those allocations."""
        vms = {a: p for a, p in self.vms.items() if alloc_ids is None or a in alloc_ids}
        found: dict[str, object] = {"vms": vms}
        if alloc_ids is None:
            found.update(
                taps=self.taps, rules=self.rules, task_state=self.task_state, leases=self.leases
            )
        return {k: v for k, v in found.items() if v}


def client_view(agent: ClusterAgent) -> ClientView:
    netns = agent.config.netns
    assert netns is not None
    view = ClientView(agent.config.name)
    for proc in processes_in(netns):
        try:
            if not proc.name().startswith("qemu-system"):
                continue
        except psutil.Error:
            continue
        paths = _descriptors(proc.pid)
        allocs = {m.group(1) for p in paths if (m := _ALLOC_DIR.search(p))}
        for alloc in allocs:
            view.vms.setdefault(alloc, []).append(proc.pid)
        view.cgroups |= _plugin_cgroups(proc.pid)
    view.taps = run_in(netns, _taps)
    view.rules = _task_rules(netns)
    data = agent.config.workdir / "plugin-data"
    # The bridge's bookkeeping (lease file, DHCP directory) outlives its tasks; its leases not.
    network = data / "network"
    view.task_state = [p for p in task_state_in(data) if network not in (p, *p.parents)]
    for leases in network.glob("leases-*.json"):
        with contextlib.suppress(OSError, ValueError):
            view.leases += sorted(json.loads(leases.read_text())["leases"])
    view.leases += [str(p) for p in network.glob("dhcp/**/*") if p.is_file()]
    return view


def bed_view(bed: ClusterBed) -> dict[str, ClientView]:
    return {c.config.name: client_view(c) for c in bed.clients}


def _descriptors(pid: int) -> list[str]:
    """What process ``pid``'s descriptors point to (directories and FIFOs too)."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _taps() -> list[str]:
    with IPRoute() as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(TAP_PREFIX))


def _task_rules(netns: str) -> list[str]:
    """Owner tags of the per-task rules in the namespace's nftables (ip and bridge tables);
    the bridge's own rules ("nomad-vm:bridge:...") are not a task's."""
    out = run_in(
        netns,
        lambda: subprocess.run(
            ["nft", "-j", "list", "ruleset"], capture_output=True, text=True, timeout=30
        ),
    )
    items = json.loads(out.stdout or '{"nftables": []}')["nftables"]
    comments = [str(i["rule"].get("comment", "")) for i in items if "rule" in i]
    return sorted({c for c in comments if is_owner_tag(c)})


def _plugin_cgroups(pid: int) -> set[Path]:
    found = set()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path.startswith("/nomad-vm/"):
            for root in controllers.split(",") if controllers else [""]:
                found.add(CGROUP_ROOT / root.removeprefix("name=") / path.lstrip("/"))
    return found


def allocations(bed: ClusterBed, job: str | None = None) -> list[dict[str, object]]:
    """The server's allocations (of ``job``, or of every job)."""
    path = f"/v1/job/{job}/allocations" if job else "/v1/allocations"
    found = bed.server.api(path)
    assert isinstance(found, list)
    return found


def node_names(bed: ClusterBed) -> dict[str, str]:
    """node ID -> node name."""
    return {str(n["ID"]): name for name, n in bed.nodes().items()}

"""A real cluster on one machine: one Nomad server and three clients, each client in its own
network namespace with its own plugin, bridge and data dir (``nomad_vm.cluster``, one bed for
the whole module). The tests spread VMs, drain a client, crash one, and finally run a bounded
chaos of plugin kills, agent restarts and jobs coming and going, comparing what Nomad's server
says with what really runs on every client (``cluster_view``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from nomad_vm.cli.paths import nomad_binary
from nomad_vm.cluster.agents import ClusterAgent
from nomad_vm.cluster.bed import BedConfig, ClusterBed, client_address
from nomad_vm.network.netns import run_in
from tests.conftest import REPO, wait_until
from tests.e2e.cluster_view import ClientView, allocations, bed_view, client_view, node_names

pytestmark = pytest.mark.e2e

JOB_FILE = REPO / "examples" / "cluster.nomad.hcl"
JOB = "cluster-web"
CHAOS_SECONDS = 90.0
_NETWORK_EVENT = re.compile(r"^Network: (\S+) on ([^\s,]+)")


@contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        print(f"[cluster] {name}: {time.monotonic() - started:.1f}s", flush=True)


@pytest.fixture(scope="module")
def bed(tiny_guest: Any, request: pytest.FixtureRequest) -> Iterator[ClusterBed]:
    failed_before = request.session.testsfailed
    workdir = Path(tempfile.mkdtemp(prefix="nvk-", dir="/tmp"))
    cluster = ClusterBed(
        BedConfig(
            workdir=workdir,
            nomad_binary=nomad_binary(),
            driver_executable=REPO / ".venv" / "bin" / "nomad-driver-vm",
            image_paths=[tiny_guest.vmlinux.parent],
        )
    )
    with phase("bed up"):
        cluster.start()
    try:
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            keep = Path(tempfile.mkdtemp(prefix=f"nvk-{cluster.id}-logs-", dir="/tmp"))
            for log in workdir.glob("*/nomad.log"):
                shutil.copy(log, keep / f"{log.parent.name}.log")
            print(f"[cluster] a test failed: the agents' logs are in {keep}")
        with phase("bed torn down"):
            cluster.teardown()
        left = [ns for ns in cluster.namespaces if Path("/run/netns", ns).exists()]
        assert not left, f"namespaces left: {left}"
        assert not workdir.exists(), f"{workdir} left"


def submit(bed: ClusterBed, guest: Any, name: str = JOB, count: int = 3) -> None:
    """Run examples/cluster.nomad.hcl as job ``name`` with ``count`` VMs (parsed by the server,
    so one file serves several jobs)."""
    variables = f'kernel = "{guest.vmlinux}"\ninitramfs = "{guest.initramfs}"\ncount = {count}\n'
    job = bed.server.api(
        "/v1/jobs/parse",
        "POST",
        {"JobHCL": JOB_FILE.read_text(), "Variables": variables, "Canonicalize": True},
    )
    assert isinstance(job, dict)
    job["ID"] = job["Name"] = name
    bed.server.api("/v1/jobs", "POST", {"Job": job})


def running(bed: ClusterBed, job: str | None = None) -> list[dict[str, Any]]:
    return [
        a
        for a in allocations(bed, job)
        if a["ClientStatus"] == "running" and a["DesiredStatus"] == "run"
    ]


def wait_for(what: str, predicate: Callable[[], object], timeout: float) -> None:
    if not wait_until(predicate, timeout, every=0.5):
        raise AssertionError(f"{what}: not within {timeout:.0f}s")


def wait_clean(bed: ClusterBed, name: str, timeout: float) -> None:
    """Wait until nothing of any task is left on client ``name``; fail naming what is."""
    last: list[object] = []

    def clean() -> bool:
        last[:] = [client_view(bed.client(name)).leftovers()]
        return not last[0]

    if not wait_until(clean, timeout, every=0.5):
        raise AssertionError(f"left on {name} after {timeout:.0f}s: {last[0]}")


def network_event(bed: ClusterBed, alloc_id: str) -> tuple[str, str]:
    """The VM's address and TAP, from the driver's task event."""
    alloc = bed.server.api(f"/v1/allocation/{alloc_id}")
    assert isinstance(alloc, dict)
    for state in (alloc.get("TaskStates") or {}).values():
        for event in state.get("Events") or []:
            if m := _NETWORK_EVENT.match(str(event.get("DisplayMessage", ""))):
                return m.group(1), m.group(2)
    raise AssertionError(f"no Network event for {alloc_id}")


def http_get(netns: str, url: str) -> str:
    def get() -> str:
        try:
            return httpx.get(url, timeout=5.0).text.strip()
        except httpx.HTTPError as exc:
            return f"error {type(exc).__name__}: {exc}"

    return run_in(netns, get)


def node_of(bed: ClusterBed, alloc: dict[str, Any]) -> str:
    return node_names(bed)[str(alloc["NodeID"])]


def host_port(alloc_id: str, bed: ClusterBed) -> int:
    full = bed.server.api(f"/v1/allocation/{alloc_id}")
    assert isinstance(full, dict)
    (port,) = [p for p in full["AllocatedResources"]["Shared"]["Ports"] if p["Label"] == "http"]
    return int(port["Value"])


def vms_by_alloc(views: dict[str, ClientView]) -> dict[str, list[tuple[str, int]]]:
    """alloc id -> (client, QEMU pid) for every VM on every client."""
    found: dict[str, list[tuple[str, int]]] = {}
    for name, view in views.items():
        for alloc, pids in view.vms.items():
            found.setdefault(alloc, []).extend((name, pid) for pid in pids)
    return found


def ensure_spread_job(bed: ClusterBed, guest: Any) -> list[dict[str, Any]]:
    if len(running(bed, JOB)) != 3:
        submit(bed, guest)
        wait_for("3 running allocations", lambda: len(running(bed, JOB)) == 3, 180)
    return running(bed, JOB)


def test_spread_job_gets_one_reachable_vm_per_client(bed: ClusterBed, tiny_guest: Any) -> None:
    with phase("spread: 3 VMs placed and running"):
        allocs = ensure_spread_job(bed, tiny_guest)
    names = {str(a["ID"]): node_of(bed, a) for a in allocs}
    assert sorted(names.values()) == ["client-1", "client-2", "client-3"], names
    views = bed_view(bed)
    vms = vms_by_alloc(views)
    assert {a: [c for c, _ in v] for a, v in vms.items()} == {a: [n] for a, n in names.items()}
    with phase("spread: every VM answers"):
        for alloc_id, name in names.items():
            client = bed.client(name)
            netns = client.config.netns
            assert netns
            address, tap = network_event(bed, alloc_id)
            assert views[name].taps == [tap]
            # The guest serves its own allocation ID: on its address on the client's bridge,
            # from inside the client's namespace ...
            url = f"http://{address}:8080/"
            answered = lambda ns=netns, u=url, a=alloc_id: http_get(ns, u) == a  # noqa: E731
            wait_for(f"{url} from {name}", answered, 120)
            # ... and through the driver's port forward on the client's address, from the
            # server's namespace across the bed's links.
            index = int(name.split("-")[1])
            forwarded = f"http://{client_address(index)}:{host_port(alloc_id, bed)}/"
            assert http_get(bed.core, forwarded) == alloc_id


def test_drain_moves_the_vm_and_leaves_nothing_behind(bed: ClusterBed, tiny_guest: Any) -> None:
    allocs = ensure_spread_job(bed, tiny_guest)
    drained = "client-1"
    (moving,) = [a for a in allocs if node_of(bed, a) == drained]
    moving_id = str(moving["ID"])
    before = client_view(bed.client(drained))
    assert list(before.vms) == [moving_id] and before.cgroups, before
    (old_pid,) = before.vms[moving_id]
    node_id = str(bed.nodes()[drained]["ID"])

    with phase("drain: VM moved to another client"):
        bed.server.nomad("node", "drain", "-enable", "-yes", "-detach", node_id)

        def moved() -> bool:
            now = {str(a["ID"]): node_of(bed, a) for a in running(bed, JOB)}
            return len(now) == 3 and drained not in now.values()

        wait_for("the drained client's allocation replaced elsewhere", moved, 180)
    with phase("drain: drained client clean"):
        wait_clean(bed, drained, 60)
    after = client_view(bed.client(drained))
    assert not after.leftovers(), after
    left = sorted(str(c) for c in before.cgroups if c.exists())
    assert not left, f"the drained VM's cgroups are left: {left}"
    old = bed.server.api(f"/v1/allocation/{moving_id}")
    assert isinstance(old, dict)
    assert (old["DesiredStatus"], old["ClientStatus"]) == ("stop", "complete"), old
    # The replacement is a new allocation with a VM of its own (a cold boot, elsewhere).
    views = bed_view(bed)
    vms = vms_by_alloc(views)
    replacement = str(old.get("NextAllocation") or "")
    assert replacement in {str(a["ID"]) for a in running(bed, JOB)}, old
    (vm,) = vms[replacement]
    assert vm[0] != drained and vm[1] != old_pid
    bed.server.nomad("node", "drain", "-disable", "-yes", node_id)


def test_sigkill_of_a_whole_client_reschedules_and_its_return_runs_nothing_twice(
    bed: ClusterBed, tiny_guest: Any
) -> None:
    ensure_spread_job(bed, tiny_guest)
    views = bed_view(bed)
    victim = max(views, key=lambda n: len(views[n].vms))
    lost = set(views[victim].vms)
    stale_pids = {p for pids in views[victim].vms.values() for p in pids}
    assert lost, views
    client = bed.client(victim)

    with phase(f"crash: {victim} (agent and plugin) SIGKILLed, {len(lost)} VM(s) replaced"):
        client.kill()

        def replaced() -> bool:
            allocs = {str(a["ID"]): a for a in allocations(bed, JOB)}
            now = running(bed, JOB)
            return (
                all(allocs[a]["ClientStatus"] == "lost" for a in lost)
                and len(now) == 3
                and all(node_of(bed, a) != victim for a in now)
            )

        wait_for("the lost allocations replaced on the other clients", replaced, 120)
    # The crash left the stale VMs running: the client is down, nobody stopped them.
    assert set(client_view(client).vms) == lost

    with phase(f"crash: {victim} back, its stale VMs stopped"):
        client.start()
        bed.wait_ready(names=[victim])
        wait_clean(bed, victim, 90)
    views = bed_view(bed)
    vms = vms_by_alloc(views)
    now = {str(a["ID"]) for a in running(bed, JOB)}
    assert {a: len(v) for a, v in vms.items()} == dict.fromkeys(now, 1), vms
    assert not stale_pids & {p for v in vms.values() for _, p in v}


# Nomad 1.11's, not the driver's: a plugin SIGKILLed while Nomad's task runner stops a task
# leaves that runner retrying the kill against the dead plugin ("failed to kill task ...
# plugin is shut down", backoff up to 2 min) without ever launching it again, so the
# allocation stays running until the agent restarts. After this long unsettled, the run
# restarts such a client's agent once (what an operator would do) and counts it.
STUCK_KILL_GRACE = 30.0
STUCK_KILL = "failed to kill task"


def clients_with_stuck_kills(clients: list[ClusterAgent], done: set[str]) -> list[ClusterAgent]:
    found = []
    for client in clients:
        if client.config.name in done:
            continue
        with contextlib.suppress(OSError):
            lines = client.log_path.read_text(errors="replace").splitlines()
            if any(STUCK_KILL in line and "plugin is shut down" in line for line in lines):
                found.append(client)
    return found


def test_chaos_leaves_one_vm_per_running_allocation_and_nothing_else(
    bed: ClusterBed, tiny_guest: Any
) -> None:
    seed = int(os.environ.get("NOMAD_VM_CHAOS_SEED") or time.time())
    rng = random.Random(seed)
    actions: dict[str, int] = {}
    jobs = [f"chaos-{i}" for i in range(1, 5)]
    seen_cgroups: set[Path] = set()
    ensure_spread_job(bed, tiny_guest)
    deadline = time.monotonic() + CHAOS_SECONDS

    def budget(seconds: float) -> float:
        """An action's wait for its effect, cut at the run's end (the settling after it
        waits for the rest)."""
        return max(5.0, min(seconds, deadline - time.monotonic()))

    def live_jobs() -> list[str]:
        found = bed.server.api("/v1/jobs")
        assert isinstance(found, list)
        return [str(j["ID"]) for j in found if not j["Stop"] and j["ID"] in jobs]

    def kill_plugin() -> None:
        client = rng.choice([c for c in bed.clients if c.pid is not None])
        killed = client.kill_plugins()
        # Nomad notices a dead plugin and launches it again (and recovers its tasks).
        wait_until(lambda: set(client.plugin_pids()) - set(killed), budget(30), every=0.5)

    def restart_agent() -> None:
        client = rng.choice(bed.clients)
        before = client.plugin_serving()
        client.restart()
        # Until the new agent's plugin serves fingerprints. Nomad 1.11 gives up on a driver
        # whose plugin dies while the agent dispenses it for the first time ("dispensing
        # initial plugin failed"): the node then has no vm driver until the agent restarts.
        # That is Nomad's, not the driver's, so the next kill waits for this.
        serving = lambda: client.plugin_serving() not in (None, before)  # noqa: E731
        wait_until(serving, budget(60), every=0.5)

    def start_job() -> None:
        name = rng.choice(jobs)
        submit(bed, tiny_guest, name, rng.randint(1, 2))
        wait_until(lambda: running(bed, name), budget(20), every=0.5)

    def stop_job() -> None:
        live = live_jobs()
        if not live:
            return start_job()
        name = rng.choice(live)
        bed.server.api(f"/v1/job/{name}", "DELETE")
        wait_until(lambda: not running(bed, name), budget(20), every=0.5)
        return None

    moves: dict[str, Callable[[], None]] = {
        "plugin SIGKILL": kill_plugin,
        "agent restart": restart_agent,
        "job start": start_job,
        "job stop": stop_job,
    }
    with phase(f"chaos: {CHAOS_SECONDS:.0f}s of actions (seed {seed})"):
        while time.monotonic() < deadline:
            name = rng.choice(list(moves))
            moves[name]()
            actions[name] = actions.get(name, 0) + 1
            for view in bed_view(bed).values():
                seen_cgroups |= view.cgroups

    restarted: set[str] = set()
    with phase("chaos: cluster settled"):
        for client in bed.clients:
            if client.pid is None:
                client.start()
        bed.wait_ready()
        last: list[object] = []
        settle_started = time.monotonic()

        def settled() -> bool:
            problems = consistency_problems(bed, [*jobs, JOB])
            last[:] = problems
            if problems and time.monotonic() - settle_started > STUCK_KILL_GRACE:
                for client in clients_with_stuck_kills(bed.clients, restarted):
                    client.restart()
                    restarted.add(client.config.name)
                    bed.wait_ready()
            return not problems

        if not wait_until(settled, 240, every=1.0):
            pytest.fail(f"the cluster did not settle (seed {seed}): {last}")
    views = bed_view(bed)
    n_allocs = len(running(bed))
    n_vms = sum(len(p) for v in views.values() for p in v.vms.values())
    summary = {
        "seed": seed,
        "actions": actions,
        "running allocations": n_allocs,
        "VMs": n_vms,
        "agents restarted for Nomad's stuck kills": sorted(restarted),
    }
    print(f"[cluster] chaos: {json.dumps(summary)}", flush=True)
    assert n_allocs == n_vms

    with phase("chaos: every job stopped, every client clean"):
        for job in [*live_jobs(), JOB]:
            bed.server.api(f"/v1/job/{job}", "DELETE")
        last_views: list[object] = []

        def clean() -> bool:
            views = bed_view(bed)
            last_views[:] = [{n: v.leftovers()} for n, v in views.items() if v.leftovers()]
            return not last_views

        if not wait_until(clean, 120, every=1.0):
            pytest.fail(f"left on the clients after every job stopped: {last_views}")
    left = sorted(str(c) for c in seen_cgroups if c.exists())
    assert not left, f"task cgroups left: {left}"


def consistency_problems(bed: ClusterBed, jobs: list[str]) -> list[str]:
    """Why the cluster is not (yet) as it should be: every live job has its count of running
    allocations, none is pending, each running allocation has exactly one VM (on its node)
    with one TAP and its rules, and no VM runs without a running allocation."""
    problems: list[str] = []
    nodes = node_names(bed)
    allocs = allocations(bed)
    for job in jobs:
        info = bed.server.api(f"/v1/job/{job}") if any(a["JobID"] == job for a in allocs) else None
        if isinstance(info, dict) and not info["Stop"]:
            want = sum(int(g["Count"]) for g in info["TaskGroups"])
            have = len([a for a in allocs if a["JobID"] == job and a["ClientStatus"] == "running"
                        and a["DesiredStatus"] == "run"])  # fmt: skip
            if have != want:
                problems.append(f"{job}: {have} running allocations, wants {want}")
    pending = [a["ID"] for a in allocs if a["ClientStatus"] == "pending"]
    if pending:
        problems.append(f"pending: {pending}")
    live = {
        str(a["ID"]): nodes.get(str(a["NodeID"]), "?")
        for a in allocs
        if a["ClientStatus"] == "running" and a["DesiredStatus"] == "run"
    }
    views = bed_view(bed)
    vms = vms_by_alloc(views)
    for alloc, where in live.items():
        found = [client for client, _ in vms.get(alloc, [])]
        if found != [where]:
            problems.append(f"allocation {alloc} on {where}: VMs on {found}")
    by_id = {str(a["ID"]): a for a in allocs}
    for alloc, found in vms.items():
        if alloc not in live:
            a = by_id.get(alloc, {})
            status = f"{a.get('DesiredStatus')}/{a.get('ClientStatus')}"
            problems.append(f"VM(s) of allocation {alloc} ({status}) not running: {found}")
    for name, view in views.items():
        n = sum(len(p) for p in view.vms.values())
        if len(view.taps) != n or len(view.rules) != n:
            problems.append(f"{name}: {n} VMs, TAPs {view.taps}, task rules {view.rules}")
        ipam = [lease for lease in view.leases if not lease.startswith("/")]
        if len(ipam) != n:
            problems.append(f"{name}: {n} VMs, leases {ipam}")
    return problems

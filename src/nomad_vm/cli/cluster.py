"""`nomad-vm cluster`: the cluster test bed (``nomad_vm.cluster``) for a person to try: one
Nomad server and three clients in network namespaces of their own, running
examples/cluster.nomad.hcl, left running until `nomad-vm cluster --stop` (`make cluster-stop`).
"""

from __future__ import annotations

import time
from pathlib import Path

from nomad_vm.cli.devagent import free_port
from nomad_vm.cli.paths import (
    NotPrivateError,
    cluster_dir,
    driver_executable,
    guest_cache_dir,
    nomad_binary,
    private_dir,
)
from nomad_vm.cluster.bed import SERVER_ADDRESS, STATE_FILE, BedConfig, ClusterBed, teardown
from nomad_vm.guests.tiny import build_tiny

JOB_FILE = Path(__file__).resolve().parents[3] / "examples" / "cluster.nomad.hcl"
JOB_NAME = "cluster-web"


def run_cluster() -> int:
    try:
        workdir = private_dir(cluster_dir())
    except NotPrivateError as exc:
        print(f"refusing to start the cluster: {exc}")
        return 1
    if (workdir / STATE_FILE).exists():
        print(f"a cluster is already running from {workdir}; stop it with `make cluster-stop`")
        return 1
    print("==> building (or reusing) the tiny test guest")
    guest = build_tiny(guest_cache_dir())
    bed = ClusterBed(
        BedConfig(
            workdir=workdir,
            nomad_binary=nomad_binary(),
            driver_executable=driver_executable(),
            image_paths=[guest.vmlinux.parent],
            log_level="INFO",
        )
    )
    print(f"==> starting a server and {len(bed.clients)} clients in namespaces {bed.namespaces}")
    bed.start()
    try:
        port = free_port()
        bed.start_relay(port)
        kernel, initramfs = f"kernel={guest.vmlinux}", f"initramfs={guest.initramfs}"
        print("==> running", JOB_FILE)
        bed.server.nomad("job", "run", "-detach", "-var", kernel, "-var", initramfs, str(JOB_FILE))
        _wait_running(bed, 3)
        print(bed.server.nomad("job", "status", JOB_NAME))
    except BaseException:
        bed.teardown()
        raise
    nomad = f"sudo ip netns exec {bed.core} env NOMAD_ADDR=http://{SERVER_ADDRESS}:4646 nomad"
    client = bed.clients[0].config.netns
    print(f"""==> the cluster keeps running (files and logs: {workdir}). Try:
    # the server's UI and API, relayed from the host's loopback:
    open http://127.0.0.1:{port}/ui   or   export NOMAD_ADDR=http://127.0.0.1:{port}
    nomad node status
    nomad job status {JOB_NAME}
    nomad node drain -enable -yes <node id>     # its VM moves to another client
    # or from inside the bed's namespaces:
    {nomad} node status
    # a VM on client-1 (its address: "Network: ..." in `nomad alloc status <alloc>`):
    sudo ip netns exec {client} wget -qO- http://<VM address>:8080/
Stop it (VMs, agents, namespaces and files) with: make cluster-stop""")
    return 0


def _wait_running(bed: ClusterBed, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        allocs = bed.server.api(f"/v1/job/{JOB_NAME}/allocations")
        assert isinstance(allocs, list)
        if sum(a["ClientStatus"] == "running" for a in allocs) >= count:
            return
        time.sleep(1.0)
    print(f"warning: fewer than {count} allocations running after {timeout:.0f}s")


def stop_cluster() -> int:
    """Tear the bed down: every process in its namespaces, the namespaces, its files."""
    try:
        workdir = private_dir(cluster_dir(), create=False)
    except NotPrivateError as exc:
        print(f"no cluster to stop: {exc}")
        return 0
    deleted = teardown(workdir)
    if not deleted:
        print("no cluster was running")
        return 0
    print(f"cluster stopped: namespaces {deleted}, their processes and {workdir} are gone")
    return 0

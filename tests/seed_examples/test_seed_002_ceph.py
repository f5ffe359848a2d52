"""Seed 002's Ceph disk example (lines 207-232: a primary disk in the directory pool "local",
a second, empty 20GB disk in the Ceph pool "ceph-storage") through a real agent that runs the
plugin as `nomad-driver-virt`, with the seed's full client configuration (lines 140-170) as
its plugin block, and a real single-node Ceph cluster (tests/ceph_cluster.py).

The cluster runs inside the agent's network namespace so that the client configuration's
Ceph keys stay the seed's: its monitor listens on 10.0.0.2:3300 (the seed's first host; the
other two are addresses of the namespace with nothing listening), its RBD pool is nomad-pool
and client.nomad has the seed's key. None of those addresses exists outside the namespace.
The plugin alone runs the same job file against the session's cluster in
tests/integration/test_seed_virt_ceph_example.py.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ceph_cluster import CephCluster, start_cluster
from tests.seed_examples.catalogue import example
from tests.seed_examples.harness import (
    BOOT_TIMEOUT,
    SeedNode,
    artifact_server,
    seed_node,
    wait_alloc_ns,
)

pytestmark = pytest.mark.e2e

IMAGE = "focal-server-cloudimg-amd64.img"  # the seed's artifact file name
JOB = example("s002_l207_ceph_disk.nomad.hcl")
CONFIG = example("s002_l140_plugin_full_ceph_storage.hcl")
# The client configuration's Ceph keys, as the seed (and CONFIG) has them.
SEED_HOSTS = ("10.0.0.2", "10.0.0.12", "10.0.0.99")
SEED_POOL = "nomad-pool"
SEED_KEY = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="
MIB = 1024 * 1024
GIB10 = 10 * 1024 * MIB
GB20 = 19074 * MIB  # 20 GB, rounded up to whole MiB


@contextlib.contextmanager
def seed_ceph(netns: str) -> Iterator[CephCluster]:
    """The cluster the seed's client configuration names, inside ``netns``."""
    for address in SEED_HOSTS:
        subprocess.run(
            ["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "lo"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    cluster = start_cluster(
        netns=netns, mon_ip=SEED_HOSTS[0], ports=(3300, 6789), pool=SEED_POOL, user_key=SEED_KEY
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def node(debian_guest: Any) -> Iterator[SeedNode]:
    with (
        seed_node(
            "virt", "virt", CONFIG, debian_guest, link_prefixes=("virbr0",), services=seed_ceph
        ) as node,
        artifact_server(node.netns, {IMAGE: debian_guest.disk}) as url,
    ):
        node.values["ARTIFACTS"] = url
        yield node


def test_the_job_validates_and_plans_on_the_real_agent(node: SeedNode) -> None:
    node.assert_validates_and_places(JOB)


def test_the_job_runs_with_its_second_disk_in_ceph_and_leaves_only_the_pool_image(
    node: SeedNode,
) -> None:
    """The guest boots from the directory pool's disk and sees the Ceph disk as its second,
    20GB, empty disk; what it writes there is in the RBD image; the image goes with the task
    and the directory pool keeps only the source image written into it."""
    ceph = node.service
    assert isinstance(ceph, CephCluster)
    node.run(JOB)
    alloc = wait_alloc_ns(node.agent, "python-server", {"running", "failed"}, "default",
                          timeout=BOOT_TIMEOUT)  # fmt: skip
    assert alloc["ClientStatus"] == "running", node.events(alloc, "virt-task")
    alloc.setdefault("Namespace", "default")
    (volume,) = ceph.admin.images(SEED_POOL)
    assert volume.startswith("nomad-vm-"), volume
    info = ceph.admin.info(volume, SEED_POOL)
    assert info["size"] == GB20, info
    node.wait_guest_agent(alloc, "virt-task")
    sizes = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda /dev/vdb").split()
    assert sizes == [str(GIB10), str(GB20)], sizes
    node.exec(
        alloc, "virt-task", "printf seed-002-ceph-marker | dd of=/dev/vdb conv=fsync 2>/dev/null"
    )
    # The first RADOS object of the RBD image holds the guest's first bytes of /dev/vdb.
    first = ceph.admin.run(
        "rados", "-p", SEED_POOL, "get", f"{info['block_name_prefix']}.0000000000000000", "-"
    )
    assert first.startswith("seed-002-ceph-marker"), first[:64]
    node.stop("python-server")
    assert ceph.admin.images(SEED_POOL) == []
    storage = Path(str(node.values["STORAGE"]))
    kept = sorted(p.name for p in storage.iterdir())
    stem = IMAGE.removesuffix(".img")
    assert len(kept) == 1 and kept[0].startswith(stem + "-") and kept[0].endswith(".qcow2"), kept

"""Seed 002 (nomad-driver-virt README, later version): its examples through a real agent that
runs the plugin installed as `nomad-driver-virt` (driver `virt`), in a network namespace of
its own with libvirt's bridge name and addresses (virbr0, 192.168.122.0/24).

Run: the python-server job (HTTP answers on its mapped port, through the plugin's port
forward), and the three directory-pool disk examples (a clone of a pool volume resized to
10GiB, a chained disk on it that leaves it unchanged, a chained disk on a source image that
the pool keeps as a volume). The several jobs the seed names "python-server" each run in a
Nomad namespace of their own. The example with a Ceph pool disk (lines 207-232) is run by
test_seed_002_ceph.py (a real agent) and tests/integration/test_seed_virt_ceph_example.py
(the plugin alone).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import vm_processes_under
from tests.e2e.conftest import wait_until_empty
from tests.seed_examples.catalogue import Example, example
from tests.seed_examples.harness import (
    SeedNode,
    artifact_server,
    poll,
    seed_node,
)

pytestmark = pytest.mark.e2e

IMAGE = "focal-server-cloudimg-amd64.img"  # the seed's file and volume name
PYTHON = example("s002_l023_python_server.nomad.hcl")
CLONE = example("s002_l236_volume_clone.nomad.hcl")
CHAINED = example("s002_l254_volume_chained.nomad.hcl")
IMAGE_CHAINED = example("s002_l273_image_chained.nomad.hcl")
GIB10 = 10 * 1024**3


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def node(debian_guest: Any) -> Iterator[SeedNode]:
    """The agent, and the artifact server in its namespace (its URL is @ARTIFACTS@)."""
    with (
        seed_node(
            "virt",
            "virt",
            example("s002_l127_plugin_minimal.hcl"),
            debian_guest,
            link_prefixes=("virbr0",),
        ) as node,
        artifact_server(node.netns, {IMAGE: debian_guest.disk}) as url,
    ):
        node.values["ARTIFACTS"] = url
        # The pool, with a copy of the Debian guest's disk as the seed's volume: root's,
        # 0700 and 0600, as the plugin keeps its pools.
        storage = Path(str(node.values["STORAGE"]))
        storage.mkdir(mode=0o700)
        volume = storage / IMAGE
        volume.write_bytes(debian_guest.disk.read_bytes())
        volume.chmod(0o600)
        yield node


@pytest.fixture(scope="module")
def started(node: SeedNode) -> dict[str, str]:
    """Every example that runs here, submitted at once (one Nomad namespace each) so that the
    guests boot side by side; example name -> namespace."""
    namespaces = {}
    for i, ex in enumerate((PYTHON, CLONE, CHAINED, IMAGE_CHAINED)):
        ns = node.namespace(f"seed002-{i}")
        node.run(ex, ns)
        namespaces[ex.name] = ns
    return namespaces


@pytest.mark.parametrize(
    "ex",
    [
        PYTHON,
        CLONE,
        CHAINED,
        IMAGE_CHAINED,
        example("s002_l310_group_ports.hcl"),
        example("s002_l336_macvtap.hcl"),
    ],
    ids=lambda e: e.name,
)
def test_each_job_validates_and_plans_on_the_real_agent(node: SeedNode, ex: Example) -> None:
    node.assert_validates_and_places(ex)


@pytest.mark.parametrize(
    "ex",
    [example("s002_l310_group_ports.hcl"), example("s002_l336_macvtap.hcl")],
    ids=lambda e: e.name,
)
def test_each_fragment_is_taken_by_the_plugin_and_refused_for_lacking_a_boot_disk(
    node: SeedNode, ex: Example
) -> None:
    """The network fragments name nothing to boot: started, the plugin decodes all of their
    keys (bridge ports, macvtap) and refuses for that alone."""
    text = node.first_driver_failure(ex, f"seed-002-l{ex.first:03d}", "virt-task")
    assert "config.image" in text and "needs something to boot" in text, text


def test_the_python_server_answers_http_on_its_mapped_port(
    node: SeedNode, started: dict[str, str]
) -> None:
    alloc = node.wait("python-server", {"running"}, started[PYTHON.name])
    # `python3 -m http.server 8000` lists the guest's / (cloud-init runs it from there).
    reply = node.http_on_port(alloc, "virt-task", "http", 8000)
    assert "Directory listing for /" in reply, reply
    # The disk block's 10GiB disk, a copy of the artifact in the task's own directory.
    size = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda").strip()
    assert size == str(GIB10), size


def test_a_clone_of_a_pool_volume_boots_resized(node: SeedNode, started: dict[str, str]) -> None:
    alloc = node.wait("python-server", {"running"}, started[CLONE.name])
    node.wait_guest_agent(alloc, "virt-task")
    size = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda").strip()
    assert size == str(GIB10), size


def test_a_chained_disk_leaves_its_pool_volume_unchanged(
    node: SeedNode, started: dict[str, str], debian_guest: Any
) -> None:
    volume = Path(str(node.values["STORAGE"])) / IMAGE
    alloc = node.wait("python-server", {"running"}, started[CHAINED.name])
    node.wait_guest_agent(alloc, "virt-task")
    node.exec(alloc, "virt-task", "echo chained > /root/marker && sync")
    size = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda").strip()
    assert size == str(GIB10), size
    assert _sha256(volume) == _sha256(debian_guest.disk)


def test_a_chained_disk_on_a_source_image_keeps_the_image_in_the_pool(
    node: SeedNode, started: dict[str, str]
) -> None:
    storage = Path(str(node.values["STORAGE"]))
    node.wait("python-server", {"running"}, started[PYTHON.name])  # its import is done
    alloc = node.wait("python-server", {"running"}, started[IMAGE_CHAINED.name])
    node.wait_guest_agent(alloc, "virt-task")
    size = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda").strip()
    assert size == str(GIB10), size
    # The image written into the pool once per source file, as <image stem>-<hash of path and
    # version>.qcow2: this job's artifact, and the python-server job's (its disk names no
    # pool, so it is in the default pool, the only one), each in its own allocation.
    stem = IMAGE.removesuffix(".img")
    imported = [
        p.name
        for p in storage.iterdir()
        if p.name.startswith(stem + "-") and p.name.endswith(".qcow2")
    ]
    assert len(imported) == 2, sorted(p.name for p in storage.iterdir())


def test_stopping_every_job_leaves_nothing_but_the_pool_volumes(
    node: SeedNode, started: dict[str, str]
) -> None:
    for ns in started.values():
        node.nomad("job", "stop", "-detach", "-namespace", ns, "python-server")
    for ns in started.values():
        node.wait("python-server", {"complete", "failed"}, ns)
    workdir = node.agent.config.workdir
    assert poll("VMs gone", lambda: not vm_processes_under(workdir), 60)
    data = Path(str(node.values["DATA_DIR"]))
    assert wait_until_empty(data / "journal-virt", 30), sorted(data.rglob("*"))


def test_the_full_libvirt_configuration_loads_healthy(debian_guest: Any) -> None:
    """Lines 140-170 as written (provider "libvirt", a Ceph pool): the plugin is healthy,
    says libvirt's settings are ignored and which pools it serves."""
    with seed_node(
        "virt",
        "virt",
        example("s002_l140_plugin_full.hcl"),
        debian_guest,
        link_prefixes=("virbr0",),
    ) as full:
        info = full.agent.wait_driver(name="virt")
        attrs = info["driver"]["Attributes"]  # type: ignore[index]
        assert "runs QEMU directly" in attrs["driver.virt.libvirt"]
        assert attrs["driver.virt.storage_pools"].startswith(
            "directory local, ceph remote-storage (default local)"
        )

"""Seed 001 (nomad-driver-virt README, earlier version): its jobs say
`driver = "nomad-driver-virt"`, so the plugin is installed `--as virt-legacy` (the same
`plugin "nomad-driver-virt"` file, registering that name). A real agent loads the seed's
driver configuration (lines 157-165, unchanged but for paths: no network block) in a network
namespace of its own with libvirt's bridge name and addresses (virbr0, 192.168.122.0/24).

Run: the python-server job answers HTTP on its mapped port through the plugin's port forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import vm_processes_under
from tests.seed_examples.catalogue import Example, example
from tests.seed_examples.harness import SeedNode, artifact_server, poll
from tests.seed_examples.harness import seed_node as _seed_node

pytestmark = pytest.mark.e2e

IMAGE = "focal-server-cloudimg-amd64.img"
PYTHON = example("s001_l032_python_server.nomad.hcl")


@pytest.fixture(scope="module")
def node(debian_guest: Any) -> Iterator[SeedNode]:
    with (
        _seed_node(
            "virt-legacy",
            "nomad-driver-virt",
            example("s001_l157_plugin.hcl"),
            debian_guest,
            link_prefixes=("virbr0",),
        ) as node,
        artifact_server(node.netns, {IMAGE: debian_guest.disk}) as url,
    ):
        node.values["ARTIFACTS"] = url
        yield node


def test_the_plugin_registers_the_older_driver_name_and_ignores_libvirt(
    node: SeedNode,
) -> None:
    info = node.agent.wait_driver(name="nomad-driver-virt")
    attrs = info["driver"]["Attributes"]  # type: ignore[index]
    assert attrs["driver.nomad-driver-virt.stands_in_for"] == "nomad-driver-virt"
    assert "runs QEMU directly" in attrs["driver.nomad-driver-virt.libvirt"]
    assert attrs["driver.nomad-driver-virt.network.bridge"] == "virbr0"


@pytest.mark.parametrize(
    "ex",
    [PYTHON, example("s001_l185_task.hcl"), example("s001_l218_group_ports.hcl")],
    ids=lambda e: e.name,
)
def test_each_job_validates_and_plans_on_the_real_agent(node: SeedNode, ex: Example) -> None:
    node.assert_validates_and_places(ex)


def test_the_group_fragment_is_taken_by_the_plugin_and_refused_for_lacking_a_boot_disk(
    node: SeedNode,
) -> None:
    """Lines 218-241 name nothing to boot: started, the plugin decodes all of their keys and
    refuses for that alone."""
    ex = example("s001_l218_group_ports.hcl")
    text = node.first_driver_failure(ex, "seed-001-l218", "virt-task")
    assert "config.image" in text and "needs something to boot" in text, text


def test_the_python_server_answers_http_on_its_mapped_port(node: SeedNode) -> None:
    node.run(PYTHON)
    alloc = node.wait("python-server", {"running"})
    # `python3 -m http.server 8000` lists the guest's / (cloud-init runs it from there).
    reply = node.http_on_port(alloc, "virt-task", "http", 8000)
    assert "Directory listing for /" in reply, reply
    # primary_disk_size = 10000 (MB): the thin copy grown to it.
    size = node.exec(alloc, "virt-task", "blockdev --getsize64 /dev/vda").strip()
    assert size == str(10000 * 1024 * 1024), size
    node.nomad("job", "stop", "-detach", "python-server")
    node.wait("python-server", {"complete", "failed"})
    assert poll("VMs gone", lambda: not vm_processes_under(node.agent.config.workdir), 60)

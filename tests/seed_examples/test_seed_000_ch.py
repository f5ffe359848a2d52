"""Seed 000 (nomad-driver-ch README): its examples through a real agent running the plugin
installed as `nomad-driver-ch`, with the seed's driver configuration (lines 202-241) and its
debug options (797-798), in a network namespace of its own where the test makes the seed's
bridge, br0 with 192.168.1.1/24, as the seed's "Configure Bridge Networking" step does.

There is no Cloud Hypervisor here: the tasks run on QEMU (the plugin's default hypervisor), so
what is checked is the jobs' own behaviour: the Quick Start VM at its static address, the
basic VM's kernel and hostname, the custom VM's user data and key, the shared volume. The
GPU examples cannot be placed (no GPU); the examples Nomad itself refuses are asserted so.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nomad_vm.network.netns import run_in
from tests.seed_examples.catalogue import Example, example
from tests.seed_examples.harness import BOOT_TIMEOUT, SeedNode, place_guest, poll, seed_node

pytestmark = pytest.mark.e2e

WEB = example("s000_l051_web_server.nomad.hcl")
BASIC = example("s000_l275_basic_vm.nomad.hcl")
CUSTOM = example("s000_l304_custom_vm.nomad.hcl")
SHARED = example("s000_l611_shared_storage.nomad.hcl")
API_REFERENCE = example("s000_l821_api_reference_one_user_data.hcl")
RUN = (WEB, BASIC, CUSTOM, SHARED, API_REFERENCE)
# The user data file the custom VM names: the seed does not give its content; this one leaves
# a mark. (web-server.yml, which the seed does give, is for the File-Based User Data fragment.)
NGINX_SETUP = """#cloud-config
write_files:
  - path: /etc/seed-000-user-data
    content: from nginx-setup.yml
"""


def _make_br0(netns: str) -> None:
    for args in (
        ("link", "add", "br0", "type", "bridge"),
        ("addr", "add", "192.168.1.1/24", "dev", "br0"),
        ("link", "set", "br0", "up"),
    ):
        subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def node(debian_guest: Any) -> Iterator[SeedNode]:
    with seed_node(
        "ch",
        "nomad-driver-ch",
        example("s000_l202_plugin.hcl"),
        debian_guest,
        link_prefixes=("br0",),
        extra_configs=[example("s000_l797_debug.hcl")],
        host_volumes=["app-data"],
        setup_netns=_make_br0,
    ) as node:
        images = node.root / "images"
        disks = ["alpine-nginx.img", "ubuntu-22.04.img", "alpine.img", "data-processor.img"]
        place_guest(images, {name: debian_guest.disk for name in [*disks, "vm-image.img"]})
        place_guest(
            node.root / "images2",
            {"vmlinuz-5.15.0": debian_guest.vmlinux, "initramfs-5.15.0.img": debian_guest.initrd},
        )
        (node.root / "images3" / "nginx-setup.yml").write_text(NGINX_SETUP)
        (images / "user-data.yml").write_text("#cloud-config\n")
        yield node


@pytest.fixture(scope="module")
def started(node: SeedNode) -> None:
    """The examples that run, submitted at once so that the guests boot side by side (the
    node's 5200 MHz hold all but shared-storage, which Nomad places once basic-vm, stopped
    after its test, leaves room)."""
    for ex in RUN:
        node.run(ex)


def test_the_plugin_loads_the_seed_driver_configuration_healthy(node: SeedNode) -> None:
    info = node.agent.wait_driver(name="nomad-driver-ch")
    attrs = info["driver"]["Attributes"]  # type: ignore[index]
    assert attrs["driver.nomad-driver-ch.network.bridge"] == "br0"
    assert attrs["driver.nomad-driver-ch.network.subnet"] == "192.168.1.0/24"
    self_ = node.agent.api("/v1/agent/self")
    assert isinstance(self_, dict)
    assert self_["config"]["EnableDebug"] is True  # lines 797-798


def test_the_client_config_as_written_is_refused_by_nomad(node: SeedNode) -> None:
    """Lines 151-179 put the `plugin` block inside `client {}`; Nomad's own config loader
    refuses that before any plugin runs."""
    path = node.write(example("s000_l151_client.hcl"))
    proc = subprocess.run(
        node.agent.command("agent", "-dev", "-config", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "client unexpected keys nomad-driver-ch, plugin" in proc.stdout + proc.stderr


PLANNED = [
    WEB,
    BASIC,
    CUSTOM,
    SHARED,
    API_REFERENCE,
    *(
        example(name)
        for name in (
            "s000_l434_auto_ip.hcl",
            "s000_l447_static_ip.hcl",
            "s000_l478_port_mapping.hcl",
            "s000_l506_user_data_file.hcl",
            "s000_l539_inline_user_data.hcl",
            "s000_l558_user_auth.hcl",
            "s000_l567_cmds.hcl",
            "s000_l599_thin_copy.hcl",
        )
    ),
]


@pytest.mark.parametrize("ex", PLANNED, ids=lambda e: e.name)
def test_each_job_validates_and_plans_on_the_real_agent(node: SeedNode, ex: Example) -> None:
    node.assert_validates_and_places(ex)


@pytest.mark.parametrize(
    ("ex", "why"),
    [
        (example("s000_l396_ml_workload.nomad.hcl"), "missing devices"),
        # Its node constraint (a node named gpu-node-1) excludes this node first.
        (example("s000_l666_ai_training.nomad.hcl"), "gpu-node-1"),
        (example("s000_l889_resources_gpu.hcl"), "missing devices"),
    ],
    ids=lambda v: v.name if isinstance(v, Example) else "",
)
def test_the_gpu_examples_cannot_be_placed_without_a_gpu(
    node: SeedNode, ex: Example, why: str
) -> None:
    ok, text = node.validate(ex)
    assert ok, text
    ok, text = node.plan(ex)
    assert "Failed to place all allocations" in text and why in text, text


@pytest.mark.parametrize(
    ("ex", "error"),
    [
        (
            example("s000_l342_database.nomad.hcl"),
            'Blocks of type "volume" are not expected here',
        ),
        (example("s000_l821_api_reference.hcl"), "Invalid expression"),
        (
            example("s000_l716_health_check.hcl"),
            'cannot use address_mode="alloc", only checks defined in a "group" service',
        ),
    ],
    ids=lambda v: v.name if isinstance(v, Example) else "",
)
def test_examples_nomad_itself_refuses(node: SeedNode, ex: Example, error: str) -> None:
    ok, text = node.validate(ex)
    assert not ok and error in text, text


FRAGMENTS = [
    example(name)
    for name in (
        "s000_l434_auto_ip.hcl",
        "s000_l447_static_ip.hcl",
        "s000_l478_port_mapping.hcl",
        "s000_l506_user_data_file.hcl",
        "s000_l539_inline_user_data.hcl",
        "s000_l558_user_auth.hcl",
        "s000_l567_cmds.hcl",
    )
]


@pytest.mark.parametrize("ex", FRAGMENTS, ids=lambda e: e.name)
def test_each_fragment_is_taken_by_the_plugin_and_refused_for_lacking_a_boot_disk(
    node: SeedNode, ex: Example
) -> None:
    """The fragments name nothing to boot: started, the plugin decodes all of their keys
    (an unknown one would be Nomad's "Unsupported argument") and refuses for that alone."""
    text = node.first_driver_failure(ex, f"seed-000-l{ex.first:03d}", "t")
    assert "config.image" in text and "needs something to boot" in text, text


def test_the_thin_copy_fragment_is_refused_for_its_missing_image(node: SeedNode) -> None:
    """Lines 599-603 name an image this node does not have: refused naming config.image."""
    ex = example("s000_l599_thin_copy.hcl")
    text = node.first_driver_failure(ex, "seed-000-l599", "t")
    assert "config.image" in text and "base-ubuntu.img" in text, text


def _ssh_banner(netns: str, address: str) -> str:
    def read() -> str:
        try:
            with socket.create_connection((address, 22), timeout=5) as s:
                return s.recv(64).decode(errors="replace")
        except OSError as exc:
            return f"error {exc}"

    return run_in(netns, read)


def test_the_quick_start_vm_is_at_its_static_address(node: SeedNode, started: None) -> None:
    node.wait("web-server", {"running"})
    banner = poll(
        "sshd at 192.168.1.100",
        lambda: (b := _ssh_banner(node.netns, "192.168.1.100")).startswith("SSH-") and b,
        BOOT_TIMEOUT,
        every=3,
    )
    assert banner.startswith("SSH-2.0-"), banner
    node.stop("web-server")


def test_the_basic_vm_boots_its_kernel_with_its_hostname(node: SeedNode, started: None) -> None:
    alloc = node.wait("basic-vm", {"running"})
    node.wait_guest_agent(alloc, "vm")
    out = node.exec(alloc, "vm", "hostname; cat /proc/cmdline")
    assert out.splitlines()[0] == "app-server", out
    assert "root=/dev/vda" in out, out
    # Its 2000 MHz are what shared-storage (2000 MHz too) needs on this 5200 MHz node.
    node.stop("basic-vm")


def test_the_custom_vm_gets_its_user_data_and_key(node: SeedNode, started: None) -> None:
    alloc = node.wait("custom-vm", {"running"})
    node.wait_guest_agent(alloc, "nginx")

    def user_data_applied() -> str:
        return (
            node.nomad(
                "alloc",
                "exec",
                "-task",
                "nginx",
                "-t=false",
                str(alloc["ID"]),
                "cat",
                "/etc/seed-000-user-data",
                check=False,
            ).strip()
            == "from nginx-setup.yml"
            and "ok"
        )

    poll("nginx-setup.yml applied", user_data_applied, BOOT_TIMEOUT, every=3)
    out = node.exec(alloc, "nginx", "hostname; cat /home/*/.ssh/authorized_keys")
    assert out.splitlines()[0] == "nginx-server", out
    assert "ssh-rsa AAAAB3NzaC1yc2E..." in out, out
    node.stop("custom-vm")


def test_the_shared_volume_is_writable_from_the_guest(node: SeedNode, started: None) -> None:
    alloc = node.wait("shared-storage", {"running"})
    node.wait_guest_agent(alloc, "processor")
    volume = node.root / "volumes" / "app-data"
    poll(
        "/app/data mounted",
        lambda: (
            "mounted"
            in node.exec(alloc, "processor", "mountpoint -q /app/data && echo mounted || true")
        ),
        BOOT_TIMEOUT,
        every=3,
    )
    node.exec(alloc, "processor", "echo from-the-guest > /app/data/hello && sync")
    assert (volume / "hello").read_text() == "from-the-guest\n"
    node.stop("shared-storage")


def test_the_api_reference_fails_naming_what_cannot_be_honoured(
    node: SeedNode, started: None
) -> None:
    alloc = node.wait("seed-000-l821", {"failed"})
    events = " ".join(node.events(alloc, "t"))
    assert "not supported yet" in events, events
    # Its os { variant = "ubuntu20.04" } is accepted (a Linux guest): the USB device is what
    # cannot be honoured here.
    assert "config.usb_devices" in events and "config.os.variant" not in events, events

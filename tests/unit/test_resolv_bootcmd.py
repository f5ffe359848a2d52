"""Name servers reach /etc/resolv.conf on images that cannot apply cloud-init's (Debian's
ifupdown without resolvconf), and only there (cloudinit.resolv)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nomad_vm.cloudinit import CloudInitRequest, render
from nomad_vm.cloudinit.resolv import WRITE_RESOLV_CONF, resolv_conf_bootcmd
from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.driver.startup import render_seed
from tests.unit.tasks import unit_task
from tests.unit.test_memory_online import user_data_config


def test_the_seed_carries_the_name_servers_as_arguments() -> None:
    servers = ("10.1.0.1", "10.1.0.2")
    req = CloudInitRequest(instance_id="nomad-1", hostname="web-1", name_servers=servers)
    bootcmd = user_data_config(render(req).user_data)["bootcmd"]
    assert bootcmd == [["sh", "-c", WRITE_RESOLV_CONF, "nomad-vm-resolv", *servers]]
    # No name servers, no bootcmd.
    plain = CloudInitRequest(instance_id="nomad-1", hostname="web-1")
    assert "bootcmd" not in user_data_config(render(plain).user_data)


def _run(tmp_path: Path, resolv: Path, with_resolvconf: bool) -> None:
    """The bootcmd's script against ``resolv`` instead of /etc/resolv.conf."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if with_resolvconf:
        tool = bin_dir / "resolvconf"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    argv = resolv_conf_bootcmd(["10.1.0.1", "10.1.0.2"])
    assert argv is not None
    argv[2] = argv[2].replace("/etc/resolv.conf", str(resolv))
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(argv, check=True, env=env)


def test_a_plain_resolv_conf_without_a_manager_gets_the_servers(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# left by the image build\n")
    _run(tmp_path, resolv, with_resolvconf=False)
    assert resolv.read_text() == "nameserver 10.1.0.1\nnameserver 10.1.0.2\n"


def test_a_managed_resolv_conf_is_left_to_its_manager(tmp_path: Path) -> None:
    stub = tmp_path / "stub-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(stub)  # systemd-resolved's or resolvconf's
    _run(tmp_path, link, with_resolvconf=False)
    assert stub.read_text() == "nameserver 127.0.0.53\n"
    plain = tmp_path / "plain.conf"
    plain.write_text("nameserver 192.0.2.1\n")
    _run(tmp_path, plain, with_resolvconf=True)  # ifupdown's resolvconf hook applies them
    assert plain.read_text() == "nameserver 192.0.2.1\n"


def test_the_plugins_dns_reaches_the_seed_of_a_task_whose_nic_names_none(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "disk.qcow2").write_bytes(b"x")
    plugin = parse_plugin_config(
        {
            "image_paths": [str(images)],
            "dns": ["10.99.0.53"],
            "network": {"subnet_cidr": "10.99.0.0/24"},
        }
    )

    def seed_servers(nic: dict[str, object]) -> list[str]:
        config = {"image": str(images / "disk.qcow2"), "network_interface": {"bridge": nic}}
        task = unit_task(tmp_path / "alloc", config)
        seed = render_seed(task, parse_task_config(task, plugin))
        assert seed is not None
        (bootcmd,) = user_data_config(seed.user_data)["bootcmd"]
        return list(bootcmd[4:])

    assert seed_servers({"name": "nomadvm0"}) == ["10.99.0.53"]
    assert seed_servers({"name": "nomadvm0", "dns": ["10.99.0.1"]}) == ["10.99.0.1"]

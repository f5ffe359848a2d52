"""The task's `display`: validated against the schema and the backend's capabilities (Cloud
Hypervisor has none), and QEMU's adapter plus a VNC server that listens nowhere until the
plugin hands it a socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.startup import plan_start
from nomad_vm.driver.types import AgentInfo
from nomad_vm.errors import ConfigError, VMRequestError
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.display import check_display, display_argv
from nomad_vm.vm.spec import VMSpec
from tests.unit.tasks import unit_task
from tests.unit.test_hypervisor_choice import registry


def spec(display: str) -> VMSpec:
    return VMSpec(
        name="v",
        vcpus=1,
        memory_mb=128,
        kernel=None,
        initramfs=None,
        cmdline="",
        accelerator="tcg",
        control_socket=Path("/run/x/qmp.sock"),
        display=display,
    )


@pytest.mark.parametrize(("display", "adapter"), [("vga", "VGA"), ("virtio", "virtio-vga")])
def test_a_display_adds_its_adapter_and_an_unbound_vnc_server(display: str, adapter: str) -> None:
    argv = qemu_argv("qemu", spec(display))
    assert argv[argv.index("-vnc") + 1] == "none"
    assert f"{adapter},id=video0" in argv
    # Never a window, and one VNC server (whose only listener the plugin hands it later).
    assert argv[argv.index("-display") + 1] == "none"
    assert argv.count("-vnc") == 1


def test_no_display_changes_nothing() -> None:
    argv = qemu_argv("qemu", spec("none"))
    assert "-vnc" not in argv and display_argv("none") == []
    assert argv[argv.index("-vga") + 1] == "none"


def test_microvm_cannot_have_a_display() -> None:
    with pytest.raises(VMRequestError) as caught:
        check_display("vga", "microvm")
    assert caught.value.option == "display" and "PCI" in caught.value.reason
    check_display("none", "microvm")
    check_display("virtio", "q35")


def plan(tmp_path: Path, options: dict[str, object]) -> object:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "vmlinux").write_bytes(b"x")
    config = parse_plugin_config(
        {"data_dir": str(tmp_path / "data"), "image_paths": [str(tmp_path / "images")]}
    )
    task = unit_task(
        tmp_path / "alloc",
        {"share_task_dirs": False, "kernel": str(tmp_path / "images" / "vmlinux"), **options},
    )
    return asyncio.run(plan_start(task, config, AgentInfo(), tmp_path / "run", registry()))


def test_bad_display_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plan(tmp_path, {"display": "cirrus"})
    assert caught.value.field == "config.display"
    assert "none, vga, virtio" in caught.value.reason


def test_cloud_hypervisor_refuses_a_display(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plan(tmp_path, {"display": "vga", "hypervisor": "cloud-hypervisor"})
    assert caught.value.field == "config.display"
    assert "no graphical console" in caught.value.reason
    assert not (tmp_path / "run").exists()


def test_unset_display_is_none(tmp_path: Path) -> None:
    planned = plan(tmp_path, {})
    assert planned.vm.display == "none"  # type: ignore[attr-defined]
    assert planned.vm_plan.request.display == "none"  # type: ignore[attr-defined]

"""The task's `free_page_reporting`: validated, carried to the request of a backend that
offers it (QEMU's declared capabilities, and Cloud Hypervisor's)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.startup import StartPlan, plan_start
from nomad_vm.driver.types import AgentInfo
from nomad_vm.errors import ConfigError
from nomad_vm.vm.qemu import backend as qemu_backend
from nomad_vm.vm.registry import HypervisorRegistry
from tests.fakes.hypervisor import FakeHost
from tests.unit.tasks import unit_task
from tests.unit.test_hypervisor_choice import KvmOnly, Qemu


class QemuCapabilities(Qemu):
    """The fake with the QEMU backend's declared capabilities."""

    capabilities = qemu_backend.CAPABILITIES


def plan(tmp_path: Path, options: dict[str, object]) -> StartPlan:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "vmlinux").write_bytes(b"x")
    config = parse_plugin_config(
        {"data_dir": str(tmp_path / "data"), "image_paths": [str(tmp_path / "images")]}
    )
    task = unit_task(
        tmp_path / "alloc",
        {"share_task_dirs": False, "kernel": str(tmp_path / "images" / "vmlinux"), **options},
    )
    host = FakeHost()
    backends = HypervisorRegistry(
        {"qemu": lambda: QemuCapabilities(host), "cloud-hypervisor": lambda: KvmOnly(host)},
        default="qemu",
    )
    return asyncio.run(plan_start(task, config, AgentInfo(), tmp_path / "run", backends))


def test_it_reaches_the_request(tmp_path: Path) -> None:
    assert plan(tmp_path, {"free_page_reporting": True}).vm_plan.request.free_page_reporting
    assert not plan(tmp_path, {}).vm_plan.request.free_page_reporting


def test_a_bad_value_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plan(tmp_path, {"free_page_reporting": "yes"})
    assert caught.value.field == "config.free_page_reporting"


def test_cloud_hypervisor_takes_it_too(tmp_path: Path) -> None:
    """The same task config is the same VM on either backend: CH's balloon reports free pages
    when the task asks (tests/unit/test_ch_vm_config.py has what CH is sent)."""
    ch = {"hypervisor": "cloud-hypervisor"}
    assert plan(tmp_path, {**ch, "free_page_reporting": True}).vm_plan.request.free_page_reporting
    assert not plan(tmp_path, ch).vm_plan.request.free_page_reporting

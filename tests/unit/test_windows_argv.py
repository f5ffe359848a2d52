"""The QEMU command line of `os { variant = "win11" }` on a KVM host, as the switch makes it:
the task config planned by the driver's own code (``driver.startup.plan_start`` with the real
QEMU backend's ``plan``), its VMSpec put together by the backend's ``build_spec`` as ``launch``
does, then ``qemu_argv``; compared with tests/unit/golden/qemu_windows_kvm.argv.

Fixed here, because they differ per host or per run and are not the switch's doing: KVM is
reported usable (the probe and the access check; no KVM here runs guests), and the
descriptors the launch would open, bind or get from swtpm and the driver's earlier steps
(disk, seed, TAP, console FIFO, firmware) have fixed numbers. Accept a change on purpose with
UPDATE_GOLDEN=1."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.startup import StartPlan, plan_start
from nomad_vm.driver.types import AgentInfo, TaskResources
from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.accel import KvmStatus
from nomad_vm.vm.handover import Handover
from nomad_vm.vm.qemu import backend as qemu_backend
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.backend import QemuHypervisor
from nomad_vm.vm.qemu.files_argv import inherited_fds
from nomad_vm.vm.qemu.plan import QemuPlan
from nomad_vm.vm.qemu.spec_build import build_spec
from nomad_vm.vm.registry import HypervisorRegistry
from nomad_vm.vm.request import LaunchDevices
from nomad_vm.vm.spec import DiskSpec, NicSpec
from tests.unit.tasks import unit_task

GOLDEN = Path(__file__).parent / "golden" / "qemu_windows_kvm.argv"
# Where the launch's files would be (only their descriptors reach QEMU's command line).
RUNTIME_DIR = Path("/run/w/nomad-vm-1")
# The sockets the plugin binds for QEMU (vm.handover), by name.
BOUND = {"qmp.sock": 9, "agent.sock": 10, "serial.sock": 16}
CONSOLE_FIFO, TAP, DISK, SEED, FW_CODE, FW_VARS, SWTPM = 17, 12, 30, 31, 40, 41, 50


class FixedHandover(Handover):
    """The launch's handover with fixed descriptor numbers and no socket made."""

    def listen(self, path: Path) -> int:
        return BOUND[path.name]


def plan_windows_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StartPlan:
    monkeypatch.setattr(qemu_backend, "probe_kvm", lambda: KvmStatus(True, "a KVM host"))
    monkeypatch.setattr(qemu_backend, "check_kvm_access", lambda user: None)
    images = tmp_path / "images"
    images.mkdir()
    (images / "win11.qcow2").write_bytes(b"x")
    plugin = parse_plugin_config(
        {"data_dir": str(tmp_path / "data"), "image_paths": [str(images)], "accelerator": "kvm"}
    )
    # What docs/windows-guests.md shows, less the network (a NIC is added below, as the
    # driver's network step would) and the task dirs shared into the guest (9p or virtio-fs,
    # whichever this host has: not the switch's doing).
    task = unit_task(
        tmp_path / "alloc",
        {
            "image": str(images / "win11.qcow2"),
            "os": {"variant": "win11"},
            "share_task_dirs": False,
        },
        name="win",
    )
    task = replace(task, resources=TaskResources(cpu_mhz=4000, memory_mb=4096))
    agent = AgentInfo(core_mhz=2000, core_count=8)
    registry = HypervisorRegistry({"qemu": QemuHypervisor}, default="qemu")
    return asyncio.run(plan_start(task, plugin, agent, RUNTIME_DIR, registry))


def windows_argv(plan: StartPlan) -> list[str]:
    """What ``QemuHypervisor.launch`` runs for this plan (its spec, then the TPM's end)."""
    details = plan.vm_plan.details
    assert isinstance(details, QemuPlan) and details.firmware is not None
    (disk,) = plan.vm.disks
    devices = LaunchDevices(
        console_fd=CONSOLE_FIFO,
        # As disk_steps and start_steps make them: the request's bus, the profile's model.
        disk=DiskSpec(HeldFile(RUNTIME_DIR / "disk.qcow2", DISK, True), "qcow2", bus=disk.bus),
        seed=HeldFile(RUNTIME_DIR / "cidata.iso", SEED, False),
        nics=(NicSpec("nvm1", "52:54:00:12:34:56", TAP, plan.vm.profile.nic_model),),
    )
    code = HeldFile(details.firmware.code, FW_CODE, False)
    variables = HeldFile(RUNTIME_DIR / "uefi-vars.fd", FW_VARS, True)
    spec = build_spec(plan.vm_plan, details, devices, code, variables, FixedHandover())
    spec = replace(spec, tpm_fd=SWTPM if details.swtpm is not None else None)
    assert sorted(inherited_fds(spec)) == sorted(
        [*BOUND.values(), CONSOLE_FIFO, TAP, DISK, SEED, FW_CODE, FW_VARS, SWTPM]
    )
    return qemu_argv("qemu-system-x86_64", spec)


def test_the_windows_switch_on_kvm_matches_golden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_windows_task(tmp_path, monkeypatch)
    # The switch's choices, as planned (the golden shows what QEMU is told of them).
    request = plan.vm_plan.request
    assert (plan.vm_plan.accelerator.name, request.machine, request.firmware) == (
        "kvm",
        "q35",
        "uefi-secure",
    )
    assert (request.tpm, request.rtc_localtime, request.seed_cdrom, request.display) == (
        True,
        True,
        True,
        "vga",
    )
    assert plan.vm_plan.display_socket == RUNTIME_DIR / "vnc.sock"
    rendered = "\n".join(windows_argv(plan)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), f"run with UPDATE_GOLDEN=1 to accept: {GOLDEN}"

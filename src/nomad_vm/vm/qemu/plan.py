"""The QEMU backend's own part of a VM's plan (what ``QemuHypervisor.plan`` decided)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.hyperv import HypervChoice
from nomad_vm.vm.machine import MachineConfig
from nomad_vm.vm.request import BackendPlan
from nomad_vm.vm.vmm_user import VMMUser


@dataclass(frozen=True)
class QemuPlan(BackendPlan):
    binary: str
    machine: MachineConfig
    firmware: FirmwarePlan | None
    # Who QEMU and its virtiofsd run as (None: as the plugin) and whether QEMU runs sandboxed.
    user: VMMUser | None
    seccomp: bool
    # Guest RAM mergeable by KSM (-machine mem-merge=on); False: QEMU's default.
    mem_merge: bool = False
    # The Hyper-V enlightenments the accelerator can give (and those it cannot); swtpm for a
    # VM with a TPM.
    hyperv: HypervChoice = field(default_factory=lambda: HypervChoice(()))
    swtpm: Path | None = None

"""The task events a start tells: what the plan decided before anything runs (share transport,
KSM, the backend's notes, memory onlining), and what the started VM is."""

from __future__ import annotations

from nomad_vm.driver.config import PluginConfig
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.ksm import KsmOutcome, ksm_start_event
from nomad_vm.driver.memory_guest import onlining_note
from nomad_vm.driver.startup import StartPlan
from nomad_vm.vm.hypervisor import RunningVM

# (message, details) of one task event.
Event = tuple[str, dict[str, str]]


def planned_events(plan: StartPlan, config: PluginConfig, ksm: KsmOutcome) -> list[str]:
    """Before the start steps: how the plan differs from what the task may expect."""
    vm_plan = plan.vm_plan
    found: list[str | None] = []
    if vm_plan.shares and vm_plan.share_transport.fallback:
        found.append(f"Shares use {vm_plan.share_transport.reason}")
    found += [ksm_start_event(config.ksm, ksm, vm_plan), *vm_plan.notes, onlining_note(plan)]
    return [note for note in found if note is not None]


def started_events(plan: StartPlan, vm: RunningVM, journal: TaskJournal) -> list[Event]:
    """Once the VM runs: its size, accelerator and pid, and the vCPUs' pinning."""
    vmm = journal.vmm
    accel = plan.vm_plan.accelerator
    request = plan.vm_plan.request
    found: list[Event] = [
        (
            f"VM started: {request.vcpus} vCPU, {request.memory_mb} MB, accelerator {accel.name}",
            {"pid": str(vmm.pid if vmm else ""), "accelerator_reason": accel.reason},
        )
    ]
    if vm.vcpu_pinning:
        pins = ", ".join(f"vCPU {v} on CPU {c}" for v, c in vm.vcpu_pinning)
        found.append((f"vCPUs pinned to the reserved cores: {pins}", {}))
    return found

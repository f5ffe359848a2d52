"""Pause and resume: `nomad alloc signal -s SIGSTOP` stops a VM's vCPUs, SIGCONT runs them again.

What a process does on these two signals is what an operator expects of a whole machine: it
holds still, keeps its memory, and goes on where it was. The VMM is never sent the signals
themselves: a stopped VMM would stop answering its control socket (and the plugin with it), so
the backend is asked (QMP stop/cont, Cloud Hypervisor's vm.pause/vm.resume) and its devices keep
running while the vCPUs do not. Whether a backend can is its ``pause`` capability.

Every other signal keeps its meaning (``guest_exec.signal_guest``). The paused state lives in
the VMM, not here: asked with ``is_paused``, it holds across plugin restarts.

A paused guest cannot see the ACPI power button, so a stop (StopTask, or SIGTERM/SIGINT, which
press it) resumes the VM first: the guest then shuts down cleanly within the kill timeout, as an
unpaused one would, instead of being terminated after waiting for nothing.
"""

from __future__ import annotations

import logging

from nomad_vm.driver.guest_exec import POWER_SIGNALS, SignalTarget, signal_guest
from nomad_vm.driver.task import VMTask
from nomad_vm.errors import HypervisorError, Unsupported
from nomad_vm.vm.hypervisor import RunningVM

log = logging.getLogger(__name__)

PAUSE_SIGNAL = "SIGSTOP"
RESUME_SIGNAL = "SIGCONT"


def normalized(signal_name: str) -> str:
    """``stop``, ``STOP`` and ``SIGSTOP`` all name SIGSTOP (Nomad passes what the user typed)."""
    name = signal_name.strip().upper()
    return name if name.startswith("SIG") else f"SIG{name}"


async def deliver_signal(entry: VMTask, signal_name: str, target: SignalTarget) -> None:
    """SignalTask: pause, resume, or what ``signal_guest`` does with the others."""
    name = normalized(signal_name)
    if name == PAUSE_SIGNAL:
        await pause_task(entry)
    elif name == RESUME_SIGNAL:
        await resume_task(entry)
    else:
        if name in POWER_SIGNALS:
            await resume_before_stop(entry)
        await signal_guest(entry, name, target)


def _running_vm(entry: VMTask, signal_name: str) -> RunningVM:
    if not entry.capabilities.pause:
        raise Unsupported(
            f"{signal_name} pauses or resumes a VM, which the {entry.journal.backend} backend "
            "cannot do"
        )
    if entry.vm is None or not entry.running:
        raise Unsupported(f"{signal_name}: the VM is not running")
    if entry.stopping:
        raise Unsupported(f"{signal_name}: the task is being stopped")
    return entry.vm


async def pause_task(entry: VMTask) -> None:
    vm = _running_vm(entry, PAUSE_SIGNAL)
    if await vm.is_paused():
        entry.emit("VM is already paused (SIGCONT resumes it)")
        return
    await vm.pause()
    entry.emit("VM paused: its vCPUs are stopped (SIGCONT resumes it)")


async def resume_task(entry: VMTask) -> None:
    vm = _running_vm(entry, RESUME_SIGNAL)
    if not await vm.is_paused():
        entry.emit("VM is not paused: nothing to resume")
        return
    await vm.resume()
    entry.emit("VM resumed")


async def resume_before_stop(entry: VMTask) -> None:
    """A paused VM is resumed so that its guest sees the power button. A VMM that cannot be
    asked is left to the stop itself (which terminates it when the button goes unanswered)."""
    vm = entry.vm
    if vm is None or not entry.running or not entry.capabilities.pause:
        return
    try:
        if not await vm.is_paused():
            return
        await vm.resume()
    except HypervisorError as exc:
        log.warning("resuming the paused VM of %s to stop it failed: %s", entry.config.id, exc)
        return
    entry.emit("VM resumed to be stopped (a paused guest cannot see the power button)")


async def report_if_paused(entry: VMTask) -> None:
    """After a reattach: say that the VM found is paused (it stays so until SIGCONT)."""
    vm = entry.vm
    if vm is None or not entry.running or not entry.capabilities.pause:
        return
    try:
        paused = await vm.is_paused()
    except HypervisorError as exc:
        log.warning("asking whether the VM of %s is paused failed: %s", entry.config.id, exc)
        return
    if paused:
        entry.emit("VM is paused (found so after the plugin restarted; SIGCONT resumes it)")

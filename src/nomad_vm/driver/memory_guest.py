"""What a guest with hot-pluggable memory (``memory_max``) must do itself, told at start.

The cloud-init seed makes a Linux guest online hot-plugged memory (``cloudinit.memory_online``).
Without a seed (``cloud_init = false``, or a VM that boots a kernel alone) nothing does, unless
the task's kernel command line says so; the operator is told at start rather than finding
out when the policy gives up (``memory_policy``: the memory is unplugged again and the guest
stays at its boot size).
"""

from __future__ import annotations

from nomad_vm.driver.startup import StartPlan

KERNEL_OPTION = "memhp_default_state="


def onlining_note(plan: StartPlan) -> str | None:
    """A start event for a guest that nothing makes online hot-plugged memory; None when
    the VM has none, gets the seed's bootcmd, is Windows, or its cmdline sets it."""
    request = plan.vm_plan.request
    if request.memory_max_mb is None or plan.seed is not None or plan.vm.profile.windows:
        return None
    if KERNEL_OPTION in request.cmdline:
        return None
    why = "cloud_init = false" if plan.vm.disks else "it boots a kernel without a disk image"
    return (
        f"Memory hot-plug: this VM gets no cloud-init seed ({why}), so the guest must online "
        "hot-plugged memory itself (memhp_default_state=online_movable on its kernel command "
        "line, or its own udev rule); a guest that does not stays at "
        f'{request.memory_mb} MB (docs/memory.md, "What the guest needs")'
    )

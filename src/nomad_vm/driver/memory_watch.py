"""A VM's hot-pluggable memory, driven: every second the guest's figures go through the
policy (``memory_policy``) and its answers to the VMM, each change told as a task event.

Runs for every VM and ends at once when the VM has no hot-pluggable memory. A guest that
does not online what is plugged gets one event, its memory unplugged, and no more changes.
After a plugin restart it starts from the size QEMU holds (read back, never remembered
by the plugin).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nomad_vm.driver.memory_policy import MIB, MemoryPolicy
from nomad_vm.errors import NomadVMError
from nomad_vm.vm.hypervisor import HotplugMemory, RunningVM

log = logging.getLogger(__name__)

# How often the guest's figures are looked at. The balloon refreshes them every 2 s
# (QemuVM.enable_guest_stats), so a change is seen within about 3 s of the guest's.
PERIOD = 1.0


def change_event(before: int, after: int, boot_mb: int, hot: HotplugMemory) -> str:
    """ "Memory plugged: +128 MiB (guest now 384 MiB of up to 768)", or unplugged."""
    delta = (after - before) // MIB
    top = boot_mb + hot.region // MIB
    now = boot_mb + after // MIB
    if delta > 0:
        return f"Memory plugged: +{delta} MiB (guest now {now} MiB of up to {top})"
    return f"Memory unplugged: {delta} MiB (guest now {now} MiB of up to {top})"


def gave_up_event(why: str, hot: HotplugMemory, boot_mb: int) -> str:
    """The one event of a guest that does not online what is plugged: why, what now, and
    what the operator can do."""
    return (
        f"Memory hot-plug stopped: {why}. Unplugging its {hot.requested // MIB} MiB: the "
        f"guest stays at {boot_mb} MiB until the task restarts. The guest must online "
        "hot-plugged memory: the cloud-init seed does it, otherwise add "
        "memhp_default_state=online_movable to the guest kernel's command line "
        '(docs/memory.md, "What the guest needs")'
    )


async def drive_memory(
    vm: RunningVM,
    boot_mb: int,
    emit: Callable[[str], None],
    seen: Callable[[HotplugMemory], None],
    policy: MemoryPolicy | None = None,
    period: float = PERIOD,
) -> None:
    """Until cancelled (the task closes) or the VMM stops answering (the VM ended)."""
    try:
        hot = await vm.hotplug_memory()
    except NomadVMError as exc:
        log.info("no hot-pluggable memory to drive: %s", exc)
        return
    if hot is None:
        return
    seen(hot)
    policy = policy or MemoryPolicy()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(period)
        try:
            hot = await vm.hotplug_memory()
            guest = await vm.guest_memory()
        except NomadVMError as exc:
            log.info("hot-pluggable memory: the VMM does not answer (%s); stopping", exc)
            return
        if hot is None:
            return
        seen(hot)
        if guest is None:
            continue  # no balloon report yet (or a guest without the balloon driver)
        if policy.gave_up is not None:
            continue  # still reading the size, as the guest gives the memory back
        wanted = policy.decide(loop.time(), guest, hot)
        resized = wanted is not None and await resize(vm, wanted, boot_mb, emit)
        if policy.gave_up is not None:
            emit(gave_up_event(policy.gave_up, hot, boot_mb))
        elif resized and wanted is not None:
            emit(change_event(hot.requested, wanted, boot_mb, hot))


async def resize(vm: RunningVM, wanted: int, boot_mb: int, emit: Callable[[str], None]) -> bool:
    try:
        await vm.resize_hotplug_memory(wanted)
    except NomadVMError as exc:
        emit(f"Memory resize to {boot_mb + wanted // MIB} MiB refused: {exc}")
        return False
    return True

"""A VM's hot-pluggable memory, driven: every second the guest's figures go through the
policy (``memory_policy``) and its answers to the VMM, each change told as a task event.

Runs for every VM and ends at once when the VM has no hot-pluggable memory. After a plugin
restart it starts from the size QEMU holds (read back, never remembered by the plugin).
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
    """"Memory plugged: +128 MiB (guest now 384 MiB of up to 768)", or unplugged."""
    delta = (after - before) // MIB
    top = boot_mb + hot.region // MIB
    now = boot_mb + after // MIB
    if delta > 0:
        return f"Memory plugged: +{delta} MiB (guest now {now} MiB of up to {top})"
    return f"Memory unplugged: {delta} MiB (guest now {now} MiB of up to {top})"


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
        wanted = policy.decide(loop.time(), guest, hot)
        if wanted is None:
            continue
        try:
            await vm.resize_hotplug_memory(wanted)
        except NomadVMError as exc:
            emit(f"Memory resize to {boot_mb + wanted // MIB} MiB refused: {exc}")
            continue
        emit(change_event(hot.requested, wanted, boot_mb, hot))

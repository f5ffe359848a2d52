"""Turn successive measurements of the VMM process into Nomad's TaskStats."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from nomad_vm.driver.types import CpuUsage, MemoryUsage, TaskStats
from nomad_vm.vm.hypervisor import VMUsage


class CpuRate:
    """CPU percentages between two samples, the way Nomad's own executor reports them.

    ``user_mode``/``system_mode``/``percent`` are percent of one core over the interval;
    ``total_ticks`` is the share of the host's compute in MHz (percent of one core x core MHz).
    Memory: ``rss`` is the VMM process's resident memory on the host (guest RAM it touched plus
    the VMM's own, e.g. QEMU TCG's translation cache); ``usage``, when the guest's balloon driver
    reports, is the memory the guest itself uses (total minus available).
    """

    def __init__(self, core_mhz: int) -> None:
        self.core_mhz = core_mhz
        self._last: tuple[float, VMUsage] | None = None

    def sample(self, task_id: str, usage: VMUsage, guest_used: int | None = None) -> TaskStats:
        now = time.monotonic()
        cpu = CpuUsage()
        if self._last is not None:
            then, prev = self._last
            elapsed = max(now - then, 1e-6)
            user = 100.0 * (usage.user_seconds - prev.user_seconds) / elapsed
            system = 100.0 * (usage.system_seconds - prev.system_seconds) / elapsed
            percent = user + system
            cpu = CpuUsage(
                user_mode=user,
                system_mode=system,
                percent=percent,
                total_ticks=percent / 100.0 * self.core_mhz,
                measured=("USER_MODE", "SYSTEM_MODE", "PERCENT", "TOTAL_TICKS"),
            )
        self._last = (now, usage)
        return TaskStats(
            task_id=task_id,
            timestamp=datetime.now(UTC),
            cpu=cpu,
            memory=(
                MemoryUsage(rss=usage.rss_bytes, usage=guest_used, measured=("RSS", "USAGE"))
                if guest_used is not None
                else MemoryUsage(rss=usage.rss_bytes, measured=("RSS",))
            ),
        )

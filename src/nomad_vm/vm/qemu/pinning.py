"""vCPU pinning: each vCPU thread of a QEMU on one of the task's reserved cores (Nomad's
cpuset), 1:1 in order, so a VM with reserved cores runs where Nomad accounted it.

QEMU names each vCPU's host thread in QMP ``query-cpus-fast``; the plugin (not QEMU, whose
sandbox denies it scheduler changes) sets each thread's affinity. Under single-threaded TCG
all vCPUs share one thread: it then gets all of their cores.
"""

from __future__ import annotations

import os
from collections import defaultdict

from nomad_vm.errors import LaunchError
from nomad_vm.vm.qemu.monitor import QemuMonitor


async def pin_vcpus(monitor: QemuMonitor, cpus: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Pin vCPU i to ``cpus[i]``; returns (vCPU index, host CPU) pairs. LaunchError when QEMU
    has a different number of vCPUs or a thread cannot be pinned (a core not online)."""
    answer = await monitor.execute("query-cpus-fast")
    assert isinstance(answer, list)
    vcpus = sorted((int(c["cpu-index"]), int(c["thread-id"])) for c in answer)
    if len(vcpus) != len(cpus):
        raise LaunchError(
            f"QEMU has {len(vcpus)} vCPUs for {len(cpus)} reserved cores; cannot pin 1:1"
        )
    threads: dict[int, set[int]] = defaultdict(set)
    for (_, thread), cpu in zip(vcpus, cpus, strict=True):
        threads[thread].add(cpu)
    for thread, wanted in threads.items():
        try:
            os.sched_setaffinity(thread, wanted)
        except OSError as exc:
            raise LaunchError(
                f"cannot pin vCPU thread {thread} to CPUs {sorted(wanted)}: {exc.strerror}"
            ) from None
    return tuple((index, cpu) for (index, _), cpu in zip(vcpus, cpus, strict=True))

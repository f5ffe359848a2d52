"""How a task's Nomad resources become the VM's size."""

from __future__ import annotations

import math
import os

from nomad_vm.driver.types import AgentInfo, TaskResources
from nomad_vm.errors import ConfigError

# The Debian kernel of our test guests needs about 96 MiB; below this no ordinary guest boots.
MIN_MEMORY_MB = 32


def count_cpuset(cpuset: str) -> int:
    """Number of CPUs in a cpuset list such as ``"0-2,5"``."""
    total = 0
    for part in filter(None, (p.strip() for p in cpuset.split(","))):
        first, _, last = part.partition("-")
        total += (int(last) - int(first) + 1) if last else 1
    return total


def expand_cpuset(cpuset: str) -> tuple[int, ...]:
    """The CPUs of a cpuset list such as ``"0-2,5"``, in order: (0, 1, 2, 5)."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in cpuset.split(","))):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(cpus)


def vcpus_for(res: TaskResources, agent: AgentInfo, host_cores: int | None = None) -> int:
    """Reserved cores win; otherwise CPU MHz over the per-core MHz Nomad measured, rounded up."""
    cores = host_cores or agent.core_count or os.cpu_count() or 1
    if res.cpuset_cpus:
        return max(1, count_cpuset(res.cpuset_cpus))
    per_core = agent.core_mhz or _host_core_mhz()
    wanted = math.ceil(res.cpu_mhz / per_core) if res.cpu_mhz > 0 else 1
    return max(1, min(wanted, cores))


def memory_mb_for(res: TaskResources) -> int:
    if res.memory_mb < MIN_MEMORY_MB:
        raise ConfigError(
            "resources.memory", f"a VM needs at least {MIN_MEMORY_MB} MB, got {res.memory_mb}"
        )
    return res.memory_mb


# virtio-mem plugs and unplugs guest memory in blocks of this size (QEMU's block-size):
# the hot-pluggable region (memory_max - memory) must be a whole number of them.
HOTPLUG_BLOCK_MB = 2


def memory_max_mb_for(res: TaskResources) -> int | None:
    """The most memory the guest may grow to (Nomad's ``memory_max``), or None when the task
    has none: unset (0) or not above ``memory``, where nothing is hot-pluggable."""
    if res.memory_max_mb <= res.memory_mb:
        # Nomad itself refuses memory_max < memory; 0 means unset.
        return None
    extra = res.memory_max_mb - res.memory_mb
    if extra % HOTPLUG_BLOCK_MB:
        raise ConfigError(
            "resources.memory_max",
            f"memory_max - memory ({extra} MB) must be a multiple of {HOTPLUG_BLOCK_MB} MB, "
            "the block size in which guest memory is plugged",
        )
    return res.memory_max_mb


def _host_core_mhz() -> int:
    """Fallback when Nomad sent no topology: the first ``cpu MHz`` in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return max(1, int(float(line.split(":", 1)[1])))
    except OSError:
        pass
    return 1000

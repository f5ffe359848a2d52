"""Resource limits for qemu-img runs on a job's image.

Resource limits (CVE-2015-5162). A crafted image can make qemu-img allocate or compute without
bound while merely opening it: a 1 KiB vmdk whose descriptor names six sparse extents with the
largest grain directories QEMU accepts makes ``qemu-img info`` take 1.8 GB and 3.6 s (each
extent's directory and its backup are read whole), and converting it spins for hours. So every
run on a job's image (``info``, ``check``, ``create`` of an overlay, which opens the base, and
``convert``) runs under ``Limits``, set by util-linux's ``prlimit`` (``prlimit --as=... --cpu=...
-- qemu-img ...``: it sets the limits on itself, then execs qemu-img, so they are in force
before qemu-img reads a byte; setting them from the plugin after spawning would race with the
child, and ``preexec_fn`` is unsafe in the plugin's threaded process). A run that hits a limit
raises ``qemu_img_run.QemuImgLimitExceeded``, which says which limit and how much.
"""

from __future__ import annotations

import math
import re
import resource
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from nomad_vm.executables import find_executable

MIB = 1024 * 1024
# What a run on a job's image may use (Nova's limits for qemu-img since CVE-2015-5162).
# Address space: legitimate runs need far less (measured with qemu-img 7.2 on the Debian test
# image: info 40 MiB, check 48 MiB, create 64 MiB, convert 256 MiB with MALLOC_ARENA_MAX=2 set
# below); the crafted vmdk above needs 1.8 GB. CPU: metadata reads take milliseconds (check:
# about 0.1 s for 100 GiB of allocated clusters), so 30 s is only ever reached by a crafted
# image; conversion gets more, in proportion to the data (``for_conversion``).
ADDRESS_SPACE_LIMIT = 1024 * MIB
CPU_SECONDS_LIMIT = 30
# Conversion reads every allocated byte: at least 1 s of CPU per 4 MiB of the chain's allocated
# data on top of the base (measured: 6 s of CPU for 730 MB of deflate-compressed vmdk, a
# tenth of what this allows; plain copies are faster still).
CONVERT_BYTES_PER_CPU_SECOND = 4 * MIB
# glibc reserves 64 MiB of address space per malloc arena, up to 8 per core, one per thread
# that allocates: qemu-img convert's I/O threads would count gigabytes of reservations against
# the limit on a large host without using them. Two arenas are plenty for qemu-img.
LIMITED_ENV = {"MALLOC_ARENA_MAX": "2"}
# What qemu-img and glibc print when an allocation, a thread or a coroutine stack cannot get
# address space (ENOMEM, or EAGAIN from pthread_create).
_OUT_OF_MEMORY = re.compile(
    r"Cannot allocate memory|[Ff]ailed to allocate|Could not allocate|[Oo]ut of memory|"
    r"qemu_thread_create: Resource temporarily unavailable"
)
PRLIMIT_HINT = "install util-linux (Debian's util-linux package provides prlimit)"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one qemu-img run: ``address_space`` in bytes (RLIMIT_AS) and
    ``cpu_seconds`` of CPU time (RLIMIT_CPU; qemu-img gets SIGXCPU there)."""

    address_space: int = ADDRESS_SPACE_LIMIT
    cpu_seconds: int = CPU_SECONDS_LIMIT

    def for_conversion(self, data_bytes: int) -> Limits:
        """These limits with CPU time for converting ``data_bytes`` of allocated data."""
        extra = math.ceil(max(data_bytes, 0) / CONVERT_BYTES_PER_CPU_SECOND)
        return replace(self, cpu_seconds=self.cpu_seconds + extra)


# The limits for every qemu-img run on a file a job supplied.
USER_IMAGE_LIMITS = Limits()


def limited_argv(argv: list[str], limits: Limits | None) -> list[str]:
    """``argv`` run through ``prlimit`` with ``limits`` (as it is, without). Each limit is
    capped at this process's own hard limit, which an unprivileged plugin could not exceed."""
    if limits is None:
        return argv
    prlimit = find_prlimit()
    space = _capped(limits.address_space, resource.RLIMIT_AS)
    # Soft limit: SIGXCPU, which ends qemu-img and tells this limit apart; the hard limit one
    # second later (SIGKILL) only matters if something caught SIGXCPU.
    cpu = _capped(limits.cpu_seconds, resource.RLIMIT_CPU)
    cpu_hard = _capped(limits.cpu_seconds + 1, resource.RLIMIT_CPU)
    return [str(prlimit), f"--as={space}", f"--cpu={cpu}:{cpu_hard}", "--", *argv]


def find_prlimit() -> Path:
    """util-linux's prlimit, which applies the limits (HypervisorError saying what to install)."""
    return find_executable(None, "prlimit", "prlimit", PRLIMIT_HINT, ("/usr/bin/prlimit",))


def _capped(value: int, which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def limit_hit(returncode: int, stderr: str) -> str | None:
    """Which limit a failed run under ``Limits`` ran into: "cpu" (killed by SIGXCPU), "memory"
    (an allocation, thread or stack that could not get address space), or None."""
    if returncode == -signal.SIGXCPU:
        return "cpu"
    if returncode != 0 and _OUT_OF_MEMORY.search(stderr):
        return "memory"
    return None

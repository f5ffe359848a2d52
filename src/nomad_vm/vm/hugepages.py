"""Huge pages for guest RAM (the task's `hugepages`): does the host have enough free?

QEMU takes them from the host's pool of the default size (``Hugepagesize``) through a hugetlb
memfd, so no hugetlbfs mount is needed. Checked before anything is created, so a task that
does not fit is refused naming its option and leaves nothing behind. (Two tasks checking at
once may both fit the check and not the pool: the second QEMU's preallocation then fails its
start, which is undone like any failed start.)
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.errors import VMRequestError

MEMINFO = Path("/proc/meminfo")


def hugepage_pool(meminfo: Path = MEMINFO) -> tuple[int, int]:
    """(huge page size in KiB, huge pages free and not reserved by another mapping)."""
    fields: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Hugepagesize", "HugePages_Free", "HugePages_Rsvd"):
            fields[name] = int(rest.split()[0])
    size = fields.get("Hugepagesize", 0)
    return size, fields.get("HugePages_Free", 0) - fields.get("HugePages_Rsvd", 0)


def check_hugepages(memory_mb: int, meminfo: Path = MEMINFO) -> None:
    """VMRequestError("hugepages") unless the guest's RAM fits in the free huge pages."""
    size_kib, free = hugepage_pool(meminfo)
    if size_kib == 0:
        raise VMRequestError("hugepages", "this host's kernel has no huge pages (HugeTLB)")
    if (memory_mb * 1024) % size_kib:
        raise VMRequestError(
            "hugepages",
            f"the task's memory ({memory_mb} MB) is not a multiple of the host's huge page "
            f"size ({size_kib} kB)",
        )
    needed = memory_mb * 1024 // size_kib
    if needed > free:
        raise VMRequestError(
            "hugepages",
            f"the guest's {memory_mb} MB need {needed} free huge pages of {size_kib} kB; the "
            f"host has {max(free, 0)} free (reserve more with sysctl vm.nr_hugepages, or "
            "remove hugepages)",
        )

"""Task options for how a VM's memory is backed (huge pages), given back to the host (free
page reporting) and kept across a stop (snapshots): docs/memory.md, docs/operations.md."""

from __future__ import annotations

from nomad_vm.fields import Field

MEMORY_FIELDS = (
    Field(
        "free_page_reporting",
        "bool",
        "The guest tells the host which of its memory it has freed (virtio-balloon's free "
        "page reporting, `free-page-reporting=on`), and the host takes those pages back: "
        "the VM's host memory shrinks after the guest frees memory, instead of staying at "
        "its peak. Needs the guest's virtio_balloon driver (Linux 5.7+). Freed memory is "
        "reported in 2 MiB blocks a few seconds after it is freed; touching it again costs "
        "the guest a page fault. QEMU and Cloud Hypervisor (see docs/memory.md).",
        default=False,
    ),
    Field(
        "snapshot_on_stop",
        "bool",
        "When the task stops (StopTask: a restart, `nomad alloc restart`, an update), the VM "
        "is paused and its memory and device state saved, with its disks, in the task's "
        "`local/` directory (which Nomad keeps across restarts in the allocation and "
        "migrates with `ephemeral_disk { migrate = true }`); the next start of the task "
        "resumes it where it was instead of booting. A snapshot is used once, and refused "
        "(the VM boots) when the task's machine changed meanwhile. QEMU and Cloud "
        "Hypervisor; not with virtio-fs shares (see docs/operations.md).",
        default=False,
    ),
    Field(
        "hugepages",
        "bool",
        "Back the guest's RAM with the host's huge pages (hugetlbfs pages of the default "
        "size, `memory-backend-memfd,hugetlb=on`, allocated when QEMU starts): fewer TLB "
        "misses for the guest, and memory the host can neither swap nor merge (KSM). The "
        "host must have enough free: reserve them with `vm.nr_hugepages`; a task that "
        "does not fit is refused before anything is created. QEMU only.",
        default=False,
    ),
)

"""The guest's hot-pluggable memory on QEMU's command line: a virtio-mem device.

The guest boots with ``-m memory`` and can grow to ``maxmem`` (Nomad's ``memory_max``): the
difference is one region of a second memory backend, which a ``virtio-mem-pci`` device hands
to the guest block by block as the driver raises its ``requested-size`` (QMP ``qom-set``; it
starts at 0). The guest's virtio_mem driver plugs and unplugs the blocks; QEMU discards the
unplugged ones, so the host gets that memory back. A pure module (golden argv files).
"""

from __future__ import annotations

from nomad_vm.vm.spec import VMSpec

# The device's id (QOM path /machine/peripheral/vmem0) and its backend's.
VMEM_DEVICE = "vmem0"
VMEM_BACKEND = "vmem0-ram"
# The unit the guest plugs and unplugs (QEMU's default would follow the backend's page size:
# 2 MiB on x86 either way; said explicitly so that the region's check in the driver holds).
BLOCK_SIZE_MB = 2


def memory_size_argv(spec: VMSpec) -> list[str]:
    """``-m``: the boot size, and with hot-pluggable memory the most the guest may reach.
    virtio-mem needs no DIMM slots (those are for pc-dimm)."""
    if spec.memory_max_mb is None:
        return ["-m", f"{spec.memory_mb}M"]
    return ["-m", f"{spec.memory_mb}M,maxmem={spec.memory_max_mb}M"]


def hotplug_memory_argv(spec: VMSpec, shared: bool, virtio: str) -> list[str]:
    """The virtio-mem device and its backend; nothing without ``memory_max_mb``.

    The backend matches the guest's boot RAM (argv._platform): shared with virtiofsd (a
    memfd, share=on) when the boot RAM is, on huge pages when it is, mergeable for KSM when
    it is. Huge pages are not preallocated for the whole region as boot RAM is: the device
    preallocates each block as it plugs it (prealloc=on), so a pool that runs dry makes
    QEMU refuse that plug instead of the VM's start (or a SIGBUS later).
    """
    if spec.memory_max_mb is None:
        return []
    size = spec.memory_max_mb - spec.memory_mb
    kind = "memory-backend-memfd" if shared or spec.hugepages else "memory-backend-ram"
    backend = f"{kind},id={VMEM_BACKEND},size={size}M"
    if shared:
        backend += ",share=on"
    if spec.hugepages:
        backend += ",hugetlb=on"
    if spec.mem_merge:
        backend += ",merge=on"
    device = (
        f"virtio-mem-{virtio},id={VMEM_DEVICE},memdev={VMEM_BACKEND},"
        f"requested-size=0,block-size={BLOCK_SIZE_MB}M"
    )
    if spec.hugepages:
        device += ",prealloc=on"
    return ["-object", backend, "-device", device]

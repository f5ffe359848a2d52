"""A running QEMU's virtio-mem device (``qemu.memory_argv``) through QMP: what it holds and
the size the driver asks of it. Everything is read back from QEMU, so a restarted plugin
finds the state where the last one left it."""

from __future__ import annotations

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.hypervisor import GuestMemory, HotplugMemory
from nomad_vm.vm.qemu.memory_argv import VMEM_BACKEND, VMEM_DEVICE
from nomad_vm.vm.qemu.monitor import QemuMonitor

DEVICE_PATH = f"/machine/peripheral/{VMEM_DEVICE}"
BACKEND_PATH = f"/objects/{VMEM_BACKEND}"


async def read_hotplug_memory(monitor: QemuMonitor) -> HotplugMemory | None:
    """The device's region, requested and plugged sizes; None for a VM without one (QEMU
    answers "Device ... not found" for the path)."""
    try:
        region = await _get_int(monitor, BACKEND_PATH, "size")
    except HypervisorError:
        return None
    requested = await _get_int(monitor, DEVICE_PATH, "requested-size")
    plugged = await _get_int(monitor, DEVICE_PATH, "size")
    return HotplugMemory(region=region, requested=requested, plugged=plugged)


async def request_size(monitor: QemuMonitor, requested: int) -> None:
    """Set the device's requested-size; QEMU refuses sizes that are not whole blocks or
    exceed the region, which the caller's policy never asks for."""
    await monitor.execute(
        "qom-set", {"path": DEVICE_PATH, "property": "requested-size", "value": requested}
    )


def guest_memory_from(reply: object) -> GuestMemory | None:
    """Total and available memory from a balloon ``guest-stats`` reply (-1: not sent; no
    ``last-update``: no report yet). Older guests without MemAvailable report free memory."""
    if not isinstance(reply, dict) or not reply.get("last-update"):
        return None
    stats = reply.get("stats") or {}
    total = stats.get("stat-total-memory", -1)
    available = stats.get("stat-available-memory", -1)
    if not isinstance(available, int) or available < 0:
        available = stats.get("stat-free-memory", -1)
    if not isinstance(total, int) or not isinstance(available, int):
        return None
    if total <= 0 or available < 0:
        return None
    updated = reply["last-update"]
    reported_at = float(updated) if isinstance(updated, int) else 0.0
    return GuestMemory(total=total, available=available, reported_at=reported_at)


async def _get_int(monitor: QemuMonitor, path: str, prop: str) -> int:
    value = await monitor.execute("qom-get", {"path": path, "property": prop})
    if not isinstance(value, int):
        raise HypervisorError(f"QMP qom-get {path} {prop}: unexpected reply {value!r}")
    return value

"""A QEMU VM's memory and device state to a file and back: QEMU's migration stream.

QEMU runs with ``-sandbox ... spawn=deny``, so ``exec:`` migration (a shell writing a file) is
impossible, and QEMU opens no file by name anyway (``files_argv``). The plugin opens the
snapshot file and hands QEMU the descriptor:

* Saving: QMP ``getfd`` gives QEMU a copy of the writable descriptor under a name, and
  ``migrate uri=fd:<name>`` writes the stream to it. The VM is stopped first (a paused VM's
  state is one consistent moment, and the disks the driver keeps with it match it); at the end
  of the migration QEMU flushes the disks and lets go of them (run state ``postmigrate``).
* Restoring: the state file is an inherited descriptor, ``-incoming fd:N`` on the command
  line (``argv``); QEMU loads it before running any vCPU and then runs the VM (no ``-S``).

Progress is polled (``query-migrate``, ``query-status``): the QMP connection's one event
queue belongs to the driver's lifecycle watcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.qemu.monitor import QemuMonitor

FD_NAME = "nomad-vm-snapshot"
# The stream goes to a local file: QEMU's default bandwidth cap (for links shared with guests'
# traffic) would only make the stop slower.
MAX_BANDWIDTH = 8 << 30
POLL_INTERVAL = 0.05
# The run state of a VM whose state is being loaded (-incoming).
INCOMING_STATE = "inmigrate"


async def save_state(monitor: QemuMonitor, fd: int, timeout: float) -> int:
    """Write the (stopped) VM's memory and device state to ``fd``; the bytes written.
    HypervisorError when QEMU fails or takes longer than ``timeout`` (the migration is then
    cancelled, and the VM stays as it was)."""
    await monitor.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    await monitor.send_fd(FD_NAME, fd)
    await monitor.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await monitor.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            ram = info.get("ram") if isinstance(info, dict) else None
            total = ram.get("total", 0) if isinstance(ram, dict) else 0
            return int(total) if isinstance(total, int) else 0
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", status) if isinstance(info, dict) else status
            raise HypervisorError(f"QEMU could not save the VM's state: {reason}")
        if loop.time() > deadline:
            await monitor.execute("migrate_cancel")
            raise HypervisorError(f"saving the VM's state took longer than {timeout:g}s")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_restored(
    monitor: QemuMonitor, still_running: Callable[[], Awaitable[bool]], timeout: float
) -> str:
    """Wait until QEMU has loaded the state it was started with (``-incoming``); its run
    state then. HypervisorError when QEMU exits (a state it could not load: its log says
    why) or takes longer than ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if not await still_running():
            raise HypervisorError("QEMU exited while loading the snapshot")
        try:
            status = await monitor.status()
        except HypervisorError:
            if not await still_running():
                raise HypervisorError("QEMU exited while loading the snapshot") from None
            raise
        if status != INCOMING_STATE:
            return status
        if loop.time() > deadline:
            raise HypervisorError(f"loading the snapshot took longer than {timeout:g}s")
        await asyncio.sleep(POLL_INTERVAL)


async def run_restored(
    monitor: QemuMonitor, still_running: Callable[[], Awaitable[bool]], timeout: float
) -> None:
    """A restore's launch returns once QEMU has loaded the state and runs the VM; on failure
    the connection is dropped (as a failed connect's is)."""
    try:
        if await wait_restored(monitor, still_running, timeout) == "paused":
            # The state was saved from a stopped VM, and QEMU restores that run state too:
            # a start runs the VM.
            await monitor.execute("cont")
    except HypervisorError:
        await monitor.close()
        raise

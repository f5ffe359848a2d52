"""One running QEMU: its process, the QMP connection the driver holds, and what it reports.

How a VM's end is known, even when the plugin was not running at that moment:

* QEMU runs with ``-action shutdown=pause,panic=pause``: when the guest powers off or panics,
  QEMU does not exit but stops the VM and keeps the verdict in its run state (``shutdown`` or
  ``guest-panicked``). The plugin, live or restarted, reads it over QMP, records the result and
  then tells QEMU to quit. No supervising process per VM is needed; the cost is that a finished
  VM's QEMU lingers (paused) while the plugin is down.
* QEMU ending without such a state was killed or crashed: as its parent the plugin gets the
  exit status; otherwise QEMU's own "terminating on signal N" line in qemu.log names the signal,
  and its absence means SIGKILL or a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from nomad_vm.errors import HypervisorError, Unsupported
from nomad_vm.files import read_log_tail
from nomad_vm.vm.description import VMDescription
from nomad_vm.vm.guest_agent import GuestAgent
from nomad_vm.vm.hypervisor import (
    GuestEvent,
    GuestEventReport,
    GuestMemory,
    HotplugMemory,
    OneProcessVMM,
    TerminalPort,
    VMRef,
)
from nomad_vm.vm.process import SupervisedProcess
from nomad_vm.vm.qemu.describe import describe_qemu
from nomad_vm.vm.qemu.hotplug_memory import guest_memory_from, read_hotplug_memory, request_size
from nomad_vm.vm.qemu.monitor import QemuEvent, QemuMonitor
from nomad_vm.vm.qemu.snapshot import save_state
from nomad_vm.vm.qemu.terminal_port import plug_terminal_port, unplug_terminal_port
from nomad_vm.vm.spec import VMExit

log = logging.getLogger(__name__)

# QEMU's own messages (stderr) go to this file in the VM's runtime directory, so a failed start
# or an unexpected end can be explained in the task event.
LOG_NAME = "qemu.log"
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
# The serial console's socket (argv.serial_argv); VMs started before it existed have none.
SERIAL_SOCKET = "serial.sock"
SIGNAL_LINE = re.compile(rb"terminating on signal (\d+)")
GUEST_DONE_STATES = {"shutdown": "poweroff", "guest-panicked": "panic"}
# The run state of a VM stopped by QMP `stop` (a user's pause), as opposed to the states above,
# which the guest's own end leaves behind (-action shutdown=pause,panic=pause).
USER_PAUSED_STATE = "paused"
# Stopped after its state was saved (``qemu.snapshot``) while the VM is to keep running: a
# paused VM for the user (``cont`` runs it again).
SAVED_STATE = "postmigrate"
BALLOON = "/machine/peripheral/balloon0"


class QemuVM(OneProcessVMM):
    """One running QEMU process and the QMP connection the driver holds to it."""

    def __init__(
        self,
        process: SupervisedProcess,
        monitor: QemuMonitor | None,
        runtime_dir: Path,
        helpers: tuple[SupervisedProcess, ...] = (),
    ) -> None:
        self.process = process
        self.monitor = monitor
        self.runtime_dir = runtime_dir
        self.log_path = runtime_dir / LOG_NAME
        # Processes serving this VM (virtiofsd); they exit when QEMU does, and are ended (and
        # reaped, when they are our children) with it.
        self.helpers = helpers
        # What the guest did, once QEMU told us: "poweroff" or "panic".
        self.guest_end: str | None = None
        self._ended: asyncio.Future[VMExit] | None = None

    @property
    def ref(self) -> VMRef:
        return VMRef(
            vmm=self.process.ident,
            control_socket=self.runtime_dir / QMP_SOCKET,
            runtime_dir=self.runtime_dir,
            helpers=tuple(helper.ident for helper in self.helpers),
        )

    async def guest_events(self) -> AsyncIterator[GuestEventReport]:
        """Lifecycle events until QEMU exits; a guest that is done (power-off, panic) is
        recorded and QEMU told to quit."""
        if self.monitor is None:
            return
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                event = asyncio.ensure_future(self.monitor.next_event())
                done, _ = await asyncio.wait({event, exited}, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    event.cancel()
                    return
                qemu_event = event.result()
                end = _guest_end(qemu_event)
                if end is not None:
                    self.guest_end = end
                report = _report(qemu_event)
                if report is not None:
                    yield report
                if end is not None:
                    await self._quit()
        finally:
            exited.cancel()

    async def check_finished_meanwhile(self) -> None:
        """After a reattach: did the guest power off or panic while nobody was watching?"""
        if self.monitor is None:
            return
        with contextlib.suppress(HypervisorError):
            end = GUEST_DONE_STATES.get(await self.monitor.status())
            if end:
                self.guest_end = end
                await self._quit()

    async def _quit(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(HypervisorError):
                await self.monitor.execute("quit")

    async def enable_guest_stats(self, interval: int = 2) -> None:
        """Ask the balloon driver in the guest to report memory statistics every few seconds."""
        if self.monitor is not None:
            with contextlib.suppress(HypervisorError):
                prop = {"path": BALLOON, "property": "guest-stats-polling-interval"}
                await self.monitor.execute("qom-set", {**prop, "value": interval})

    async def guest_memory_used(self) -> int | None:
        """Bytes the guest itself uses (total minus available), or None when it does not say
        (no balloon driver in the guest, or no report yet)."""
        reply = await self._balloon_stats()
        return None if reply is None else guest_used_bytes(reply)

    async def guest_memory(self) -> GuestMemory | None:
        """The balloon's latest report of the guest's total and available memory."""
        reply = await self._balloon_stats()
        return None if reply is None else guest_memory_from(reply)

    async def _balloon_stats(self) -> object | None:
        """The balloon's latest guest-stats reply; None without a monitor or balloon."""
        if self.monitor is None:
            return None
        try:
            return await self.monitor.execute(
                "qom-get", {"path": BALLOON, "property": "guest-stats"}
            )
        except HypervisorError:
            return None

    async def hotplug_memory(self) -> HotplugMemory | None:
        if self.monitor is None:
            return None
        return await read_hotplug_memory(self.monitor)

    async def resize_hotplug_memory(self, requested: int) -> None:
        await request_size(self._require_monitor("resized"), requested)

    async def power_down(self) -> bool:
        """Press the ACPI power button; False when QMP is unavailable."""
        if self.monitor is None:
            return False
        try:
            await self.monitor.execute("system_powerdown")
        except HypervisorError as exc:
            log.warning("ACPI powerdown request failed: %s", exc)
            return False
        return True

    async def pause(self) -> None:
        """QMP ``stop``: the vCPU threads stop; QEMU and its devices stay."""
        await self._require_monitor("paused").execute("stop")

    async def resume(self) -> None:
        """QMP ``cont``. Refused for a VM the guest ended: QEMU keeps it stopped only to hold
        that verdict (``cont`` would not run it again without a reset)."""
        monitor = self._require_monitor("resumed")
        if self.guest_end is not None:
            raise HypervisorError(f"the guest has ended ({self.guest_end}); nothing to resume")
        await monitor.execute("cont")

    async def save_state(self, fd: int, timeout: float) -> int:
        """The stopped VM's memory and device state to ``fd`` (``qemu.snapshot``)."""
        return await save_state(self._require_monitor("saved"), fd, timeout)

    async def is_paused(self) -> bool:
        if self.monitor is None:
            return False
        return await self.monitor.status() in (USER_PAUSED_STATE, SAVED_STATE)

    async def describe(self) -> VMDescription:
        monitor = self._require_monitor("described")
        return await describe_qemu(monitor, self.process.pid, self.runtime_dir)

    def _require_monitor(self, what: str) -> QemuMonitor:
        if self.monitor is None:
            raise HypervisorError(f"QMP is unavailable, so the VM cannot be {what}")
        return self.monitor

    def guest_verdict(self) -> str | None:
        return self.guest_end

    def vmm_exit(self, ended: VMExit) -> VMExit:
        signalled = ended.signal or _signal_from_log(self.log_path)
        if signalled and not ended.signal:
            name = signal.Signals(signalled).name
            ended = VMExit(None, signalled, f"QEMU was terminated by {name}")
        if ended.clean:
            return ended
        tail = read_log_tail(self.log_path)
        return VMExit(ended.code, ended.signal, f"{ended.reason}: {tail}" if tail else ended.reason)

    def guest_agent(self) -> GuestAgent | None:
        socket = self.runtime_dir / AGENT_SOCKET
        return GuestAgent(socket) if socket.exists() else None

    def console_socket(self) -> Path | None:
        socket = self.runtime_dir / SERIAL_SOCKET
        return socket if socket.exists() else None

    async def open_terminal(self) -> TerminalPort:
        if self.monitor is None:
            raise Unsupported("QMP is unavailable, so no terminal port can be added to this VM")
        return await plug_terminal_port(self.monitor, self.runtime_dir)

    async def close_terminal(self, port: TerminalPort) -> None:
        if self.monitor is not None:
            await unplug_terminal_port(self.monitor, port)

    async def close(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.cancel()
        if self.monitor is not None:
            await self.monitor.close()
        self.process.close()
        for helper in self.helpers:
            helper.close()


def _guest_end(event: QemuEvent) -> str | None:
    if event.name == "SHUTDOWN" and event.data.get("guest"):
        return "poweroff"
    if event.name == "GUEST_PANICKED":
        return "panic"
    return None


def _report(event: QemuEvent) -> GuestEventReport | None:
    """What a QMP lifecycle event says the guest did; None for the ones that say nothing."""
    if event.name == "RESET" and event.data.get("guest"):
        return GuestEventReport(GuestEvent.REBOOTED)
    if event.name == "SHUTDOWN" and event.data.get("guest"):
        return GuestEventReport(GuestEvent.POWERED_OFF, str(event.data.get("reason", "")))
    if event.name == "GUEST_PANICKED":
        return GuestEventReport(GuestEvent.PANICKED)
    return None


def guest_used_bytes(reply: object) -> int | None:
    """Used memory from a balloon ``guest-stats`` reply; -1 marks a value the guest did not send."""
    if not isinstance(reply, dict) or not reply.get("last-update"):
        return None
    stats = reply.get("stats") or {}
    total = stats.get("stat-total-memory", -1)
    free = stats.get("stat-available-memory", -1)
    if free is None or free < 0:
        free = stats.get("stat-free-memory", -1)
    if not isinstance(total, int) or not isinstance(free, int) or total <= 0 or free < 0:
        return None
    return max(0, total - free)


def _signal_from_log(path: Path) -> int | None:
    """QEMU logs "terminating on signal N from pid P" when a signal made it exit."""
    try:
        found = SIGNAL_LINE.findall(path.read_bytes()[-4096:])
    except OSError:
        return None
    return int(found[-1]) if found else None

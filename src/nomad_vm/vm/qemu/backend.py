"""The QEMU backend: launch a VMSpec, reattach to a running VM, stop it, measure it.

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
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from nomad_vm.errors import HypervisorError, LaunchError
from nomad_vm.files import read_log_tail
from nomad_vm.processes import ProcessIdentity
from nomad_vm.vm.process import SupervisedProcess, reattach, spawn
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.monitor import QemuEvent, QemuMonitor, connect_when_ready
from nomad_vm.vm.spec import VMExit, VMSpec
from nomad_vm.vm.virtiofsd import early_exit_report, kill_daemons, start_daemons

log = logging.getLogger(__name__)

# How long QEMU may take to create its QMP socket. It is milliseconds normally; a loaded CI host
# with several TCG guests booting can stretch it.
QMP_READY_TIMEOUT = 30.0
# QEMU's own messages (stderr) go to this file in the VM's runtime directory, so a failed start
# or an unexpected end can be explained in the task event.
LOG_NAME = "qemu.log"
SIGNAL_LINE = re.compile(rb"terminating on signal (\d+)")
GUEST_DONE_STATES = {"shutdown": "poweroff", "guest-panicked": "panic"}
BALLOON = "/machine/peripheral/balloon0"
# A virtiofsd exits as soon as QEMU closes its socket; one that has not after this is killed.
HELPER_GRACE = 5.0


@dataclass(frozen=True)
class VMUsage:
    """Raw host-side measurements of the VMM process."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int


class QemuVM:
    """One running QEMU process and the QMP connection the driver holds to it."""

    def __init__(
        self,
        process: SupervisedProcess,
        monitor: QemuMonitor | None,
        log_path: Path,
        helpers: tuple[SupervisedProcess, ...] = (),
    ) -> None:
        self.process = process
        self.monitor = monitor
        self.log_path = log_path
        # Processes serving this VM (virtiofsd) that this plugin started; they exit when QEMU
        # does, and are reaped (waited for) with it.
        self.helpers = helpers
        # What the guest did, once QEMU told us: "poweroff" or "panic".
        self.guest_end: str | None = None

    @property
    def helper_identities(self) -> tuple[ProcessIdentity, ...]:
        return tuple(helper.ident for helper in self.helpers)

    @property
    def identity(self) -> ProcessIdentity:
        return self.process.ident

    async def follow_events(self, on_event: Callable[[QemuEvent], None]) -> None:
        """Report lifecycle events until the VM ends; end QEMU once the guest is done."""
        if self.monitor is None:
            return
        while True:
            event = await self.monitor.next_event()
            on_event(event)
            if event.name == "SHUTDOWN" and event.data.get("guest"):
                await self._guest_finished("poweroff")
            elif event.name == "GUEST_PANICKED":
                await self._guest_finished("panic")

    async def check_finished_meanwhile(self) -> None:
        """After a reattach: did the guest power off or panic while nobody was watching?"""
        if self.monitor is None:
            return
        with contextlib.suppress(HypervisorError):
            end = GUEST_DONE_STATES.get(await self.monitor.status())
            if end:
                await self._guest_finished(end)

    async def _guest_finished(self, end: str) -> None:
        self.guest_end = end
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
        if self.monitor is None:
            return None
        try:
            reply = await self.monitor.execute(
                "qom-get", {"path": BALLOON, "property": "guest-stats"}
            )
        except HypervisorError:
            return None
        return guest_used_bytes(reply)

    async def powerdown(self) -> bool:
        """Press the ACPI power button; False when QMP is unavailable."""
        if self.monitor is None:
            return False
        try:
            await self.monitor.execute("system_powerdown")
        except HypervisorError as exc:
            log.warning("ACPI powerdown request failed: %s", exc)
            return False
        return True

    async def wait(self) -> VMExit:
        ended = await self.process.wait()
        for helper in self.helpers:
            await helper.terminate(HELPER_GRACE)
        if self.guest_end == "poweroff":
            return VMExit(0, None, "the guest powered off", guest_poweroff=True)
        if self.guest_end == "panic":
            return VMExit(None, None, "the guest kernel panicked", panicked=True)
        signalled = ended.signal or _signal_from_log(self.log_path)
        if signalled and not ended.signal:
            name = signal.Signals(signalled).name
            ended = VMExit(None, signalled, f"QEMU was terminated by {name}")
        if ended.clean:
            return ended
        tail = read_log_tail(self.log_path)
        return VMExit(ended.code, ended.signal, f"{ended.reason}: {tail}" if tail else ended.reason)

    async def terminate(self, grace: float) -> None:
        """End QEMU now: SIGTERM (QEMU exits at once), SIGKILL after ``grace`` seconds."""
        await self.process.terminate(grace)

    def usage(self) -> VMUsage:
        try:
            proc = psutil.Process(self.process.pid)
            with proc.oneshot():
                times = proc.cpu_times()
                rss = proc.memory_info().rss
        except psutil.Error as exc:
            pid = self.process.pid
            raise HypervisorError(f"cannot read usage of QEMU pid {pid}: {exc}") from exc
        return VMUsage(times.user, times.system, rss)

    async def close(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()
        self.process.close()
        for helper in self.helpers:
            helper.close()


class QemuBackend:
    def __init__(self, binary: str, virtiofsd: Path | None = None) -> None:
        self.binary = binary
        self.virtiofsd = virtiofsd

    async def launch(self, spec: VMSpec, console_fd: int, runtime_dir: Path) -> QemuVM:
        """Start QEMU (and the virtiofsd its shares need) and return once its QMP socket
        answers; no process is left on failure."""
        argv = qemu_argv(self.binary, spec)
        daemons = []
        if spec.share_transport == "virtiofs" and spec.shares:
            if self.virtiofsd is None:
                raise ValueError("virtio-fs shares need the virtiofsd binary")
            daemons = start_daemons(self.virtiofsd, spec.shares, runtime_dir)
        log_path = runtime_dir / LOG_NAME
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                fds = [nic.fd for nic in spec.nics if nic.fd is not None]
                process = spawn(
                    argv, stdout=console_fd, stderr=log_fd, cwd=runtime_dir, pass_fds=fds
                )
            finally:
                os.close(log_fd)
        except BaseException:
            kill_daemons(daemons)
            raise
        log.debug("started qemu", extra={"fields": {"pid": process.pid, "argv": " ".join(argv)}})

        async def running() -> bool:
            return process.exit is None and _alive(process)

        try:
            monitor, _ = await connect_when_ready(spec.control_socket, running, QMP_READY_TIMEOUT)
        except HypervisorError as exc:
            # A share daemon that failed first is the cause; QEMU only saw "Connection refused".
            cause = early_exit_report(daemons)
            await process.terminate(grace=2.0)
            kill_daemons(daemons)
            tail = read_log_tail(log_path)
            process.close()
            if cause:
                raise LaunchError(f"QEMU failed to start: {cause}") from None
            raise LaunchError(f"QEMU failed to start: {tail or exc}") from None
        except BaseException:
            # Cancelled (Nomad gave up on StartTask, the agent is shutting down): nobody will
            # ever learn of this VM, so it must not outlive the call.
            process.kill_and_reap()
            kill_daemons(daemons)
            raise
        vm = QemuVM(process, monitor, log_path, tuple(d.process for d in daemons))
        try:
            await vm.enable_guest_stats()
        except BaseException:
            process.kill_and_reap()
            kill_daemons(daemons)
            await monitor.close()
            raise
        return vm

    async def reattach(self, ident: ProcessIdentity, socket: Path, runtime_dir: Path) -> QemuVM:
        """Find a QEMU started by an earlier plugin process (pid + start time, then QMP)."""
        process = reattach(ident)
        monitor: QemuMonitor | None = QemuMonitor(socket)
        assert monitor is not None
        try:
            await monitor.connect()
        except HypervisorError as exc:
            # The process is ours but QMP is unusable: watch the process, stop by signal.
            log.warning("reattached without QMP: %s", exc)
            await monitor.close()
            monitor = None
        vm = QemuVM(process, monitor, runtime_dir / LOG_NAME)
        await vm.check_finished_meanwhile()
        return vm


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


def _alive(process: SupervisedProcess) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE
    return False


def _signal_from_log(path: Path) -> int | None:
    """QEMU logs "terminating on signal N from pid P" when a signal made it exit."""
    try:
        found = SIGNAL_LINE.findall(path.read_bytes()[-4096:])
    except OSError:
        return None
    return int(found[-1]) if found else None


async def sleep_until_exit(vm: QemuVM, timeout: float) -> bool:
    """True when QEMU exits within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(vm.process.wait(), timeout)
    except TimeoutError:
        return False
    return True

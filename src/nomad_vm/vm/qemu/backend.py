"""The QEMU backend: launch a VMSpec, reattach to a running VM, stop it, measure it."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from nomad_vm.errors import HypervisorError, LaunchError
from nomad_vm.vm.process import ProcessIdentity, SupervisedProcess, reattach, spawn
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.monitor import wait_for_qmp
from nomad_vm.vm.spec import VMExit, VMSpec

log = logging.getLogger(__name__)

# How long QEMU may take to create its QMP socket. It is milliseconds normally; a loaded CI host
# with several TCG guests booting can stretch it.
QMP_READY_TIMEOUT = 30.0
# QEMU's own messages (stderr) go to this file in the VM's runtime directory, so a failed start
# can quote them in the task event.
LOG_NAME = "qemu.log"


@dataclass(frozen=True)
class VMUsage:
    """Raw host-side measurements of the VMM process."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int


class QemuVM:
    """One running QEMU process."""

    def __init__(self, process: SupervisedProcess, socket: Path, log_path: Path) -> None:
        self.process = process
        self.control_socket = socket
        self.log_path = log_path

    @property
    def identity(self) -> ProcessIdentity:
        return self.process.ident

    async def wait(self) -> VMExit:
        ended = await self.process.wait()
        if ended.clean:
            return ended
        tail = read_log_tail(self.log_path)
        return VMExit(ended.code, ended.signal, f"{ended.reason}: {tail}" if tail else ended.reason)

    async def stop(self, grace: float) -> VMExit:
        """Forceful stop: SIGTERM (QEMU exits at once), SIGKILL after ``grace`` seconds."""
        await self.process.terminate(grace)
        return await self.wait()

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

    def close(self) -> None:
        self.process.close()


class QemuBackend:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    async def launch(self, spec: VMSpec, console_fd: int, runtime_dir: Path) -> QemuVM:
        """Start QEMU and return once its QMP socket answers; no process is left on failure."""
        argv = qemu_argv(self.binary, spec)
        log_path = runtime_dir / LOG_NAME
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            process = spawn(argv, stdout=console_fd, stderr=log_fd, cwd=runtime_dir)
        finally:
            os.close(log_fd)
        log.debug("started qemu", extra={"fields": {"pid": process.pid, "argv": " ".join(argv)}})
        vm = QemuVM(process, spec.control_socket, log_path)

        async def running() -> bool:
            return process.exit is None and process.ident.pid > 0 and _alive(process)

        try:
            await wait_for_qmp(spec.control_socket, running, QMP_READY_TIMEOUT)
        except HypervisorError as exc:
            await process.terminate(grace=2.0)
            tail = read_log_tail(log_path)
            process.close()
            raise LaunchError(f"QEMU failed to start: {tail or exc}") from None
        return vm

    def reattach(self, ident: ProcessIdentity, socket: Path, runtime_dir: Path) -> QemuVM:
        return QemuVM(reattach(ident), socket, runtime_dir / LOG_NAME)


def _alive(process: SupervisedProcess) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE
    return False


def read_log_tail(path: Path, limit: int = 2000) -> str:
    """The last lines of QEMU's log, as one line of text for an event or error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())

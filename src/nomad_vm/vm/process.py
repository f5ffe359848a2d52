"""Supervision of VMM processes, shared by every backend.

A VMM runs in its own session, so it outlives the plugin (Nomad restarts plugins freely) and a
Ctrl-C in the terminal of `nomad agent -dev` does not reach it. A process is identified by its pid
*and* its start time: after a plugin restart a recycled pid must never be taken for our VM.
Exit is watched through a pidfd, which works for processes that are not our children too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nomad_vm.errors import HypervisorError, LaunchError
from nomad_vm.processes import ProcessIdentity, identity_of, is_same_process
from nomad_vm.vm.spec import VMExit


class SupervisedProcess:
    """A VMM process: started by us (``Popen`` known, real exit status) or re-found by identity."""

    def __init__(self, ident: ProcessIdentity, popen: subprocess.Popen[bytes] | None) -> None:
        self.ident = ident
        self._popen = popen
        self._exit: VMExit | None = None
        self._pidfd: int | None = None
        self._waiter: asyncio.Future[VMExit] | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(ident.pid)

    @property
    def pid(self) -> int:
        return self.ident.pid

    @property
    def exit(self) -> VMExit | None:
        return self._exit

    def poll(self) -> int | None:
        """The exit status of our own child if it has ended (negative: killed by that signal);
        None while it runs, or when it is not our child."""
        if self._popen is None:
            return None
        return self._popen.poll()

    async def wait(self) -> VMExit:
        """Block until the process ends and return how it ended. Safe to call concurrently."""
        if self._exit is not None:
            return self._exit
        if self._waiter is None:
            self._waiter = asyncio.ensure_future(self._wait_once())
        return await asyncio.shield(self._waiter)

    async def _wait_once(self) -> VMExit:
        if self._pidfd is not None:
            await _wait_readable(self._pidfd)
        else:  # the process was already gone when we looked
            while is_same_process(self.ident):
                await asyncio.sleep(0.2)
        self._exit = self._collect()
        self._close_pidfd()
        return self._exit

    def _collect(self) -> VMExit:
        if self._popen is None:
            return VMExit(None, None, "the VMM ended while it was not the plugin's child")
        code = self._popen.wait()
        if code < 0:
            name = signal.Signals(-code).name
            return VMExit(None, -code, f"the VMM was killed by {name}")
        if code == 0:
            return VMExit(0, None, "the VMM exited normally")
        return VMExit(code, None, f"the VMM exited with status {code}")

    def send_signal(self, sig: int) -> None:
        if self._exit is not None or not is_same_process(self.ident):
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def terminate(self, grace: float) -> VMExit:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
        self.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            self.send_signal(signal.SIGKILL)
            return await self.wait()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        """SIGKILL and, for our own child, collect its exit status at once (no zombie left).
        For failure paths where nothing awaits the process; SIGKILL makes the wait short."""
        self.send_signal(signal.SIGKILL)
        if self._popen is not None and self._exit is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        self._close_pidfd()

    def close(self) -> None:
        self._close_pidfd()


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)


def spawn(
    argv: Sequence[str], *, stdout: int, stderr: int, cwd: Path, pass_fds: Sequence[int] = ()
) -> SupervisedProcess:
    """Start ``argv`` in a new session with the given output fds and no stdin; ``pass_fds``
    are inherited under the same numbers."""
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    except OSError as exc:
        raise LaunchError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    ident = identity_of(popen.pid) or ProcessIdentity(popen.pid, 0.0)
    return SupervisedProcess(ident, popen)


def reattach(ident: ProcessIdentity) -> SupervisedProcess:
    """Find a VMM started by an earlier plugin process; HypervisorError if it is gone."""
    if not is_same_process(ident):
        raise HypervisorError(
            f"process {ident.pid} started at {ident.start_time} no longer exists "
            "(or the pid now belongs to another process)"
        )
    return SupervisedProcess(ident, None)


def kill_leftovers(idents: Sequence[ProcessIdentity]) -> None:
    """SIGKILL each process that still runs under its identity (never a recycled pid)."""
    for ident in idents:
        if is_same_process(ident):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ident.pid, signal.SIGKILL)

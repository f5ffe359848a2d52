"""Supervision of VMM processes, shared by every backend.

A VMM runs in its own session, so it outlives the plugin (Nomad restarts plugins freely) and a
Ctrl-C in the terminal of `nomad agent -dev` does not reach it. A process is identified by its
pid, start ticks and boot id (``nomad_vm.processes``): after a plugin restart a recycled pid must
never be taken for our VM. Exit is watched through a pidfd, which works for processes that are
not our children too.

Backends start every process *gated*: it is forked as ``/bin/sh`` waiting for one line on its
stdin (a pipe only the plugin holds) and only then execs the real program, with the same pid and
start ticks. The driver records the identity in the task's journal between the fork and
``release``. If the plugin dies in between, the pipe reaches end-of-file and the shell exits
without running anything: no VMM or helper ever runs that the journal does not know. (The
pipe's ends are close-on-exec, and every child is spawned with ``close_fds``, so no other
process holds the plugin's end.) The shell costs about 0.7 ms before the program runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nomad_vm.errors import HypervisorError, LaunchError
from nomad_vm.processes import ProcessIdentity, identity_of, is_same_process
from nomad_vm.vm.spec import VMExit
from nomad_vm.vm.vmm_user import VMMUser

# Waits for the plugin's go (one line on stdin), then becomes the program with stdin on
# /dev/null; end-of-file first (the plugin died before recording the process) ends it unrun.
log = logging.getLogger(__name__)

GATE_SHELL = "/bin/sh"
GATE_SCRIPT = 'read -r _ || exit 125; exec "$@" </dev/null'
GATE_NAME = "nomad-vm-gate"
# Seconds between the checks of a watched process's liveness besides its pidfd (one /proc read).
LIVENESS_CHECK = 2.0


class SupervisedProcess:
    """A VMM process: started by us (``Popen`` known, real exit status) or re-found by identity."""

    def __init__(
        self,
        ident: ProcessIdentity,
        popen: subprocess.Popen[bytes] | None,
        gate: int | None = None,
    ) -> None:
        self.ident = ident
        self._popen = popen
        self._exit: VMExit | None = None
        self._pidfd: int | None = None
        self._waiter: asyncio.Future[VMExit] | None = None
        # The write end of a gated process's stdin until ``release``.
        self._gate = gate
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(ident.pid)

    def release(self) -> None:
        """Let a gated process exec its program (its identity is on record by now)."""
        if self._gate is None:
            return
        with contextlib.suppress(OSError):  # already killed: nothing left to release
            os.write(self._gate, b"go\n")
        self._close_gate()

    def _close_gate(self) -> None:
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None

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
            await _wait_readable(self._pidfd, lambda: is_same_process(self.ident))
        else:  # the process was already gone when we looked
            while is_same_process(self.ident):
                await asyncio.sleep(0.2)
        self._exit = self._collect()
        # The waiter itself: its reader is already unregistered.
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
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
        """Close the pidfd from outside the waiter (which is cancelled if still waiting)."""
        if self._pidfd is None:
            return
        if self._waiter is not None and not self._waiter.done():
            # The waiter watches a duplicate of its own (``_wait_readable``), which it stops
            # watching and closes as it ends: closing ours now is safe.
            self._waiter.cancel()
        os.close(self._pidfd)
        self._pidfd = None

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        """SIGKILL and, for our own child, collect its exit status at once (no zombie left).
        For failure paths where nothing awaits the process; SIGKILL makes the wait short."""
        self._close_gate()
        self.send_signal(signal.SIGKILL)
        if self._popen is not None and self._exit is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        self._close_pidfd()

    def close(self) -> None:
        # An unreleased gated process reads end-of-file and ends without running its program.
        self._close_gate()
        self._close_pidfd()


async def _wait_readable(fd: int, alive: Callable[[], bool]) -> None:
    """Until the pidfd ``fd`` is readable (its process ended).

    The event loop watches a duplicate that only this wait closes, after it stopped watching:
    the caller may close ``fd`` meanwhile, and a new descriptor given the same number is then
    never confused with this registration (asyncio keys its registrations by number). And every
    ``LIVENESS_CHECK`` seconds ``alive`` is asked too: a VM whose end went unnoticed would leave
    Nomad waiting for the task forever, so the wait never rests on the registration alone."""
    loop = asyncio.get_running_loop()
    own = os.dup(fd)
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(own, ready)
    try:
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(done), LIVENESS_CHECK)
                return
            except TimeoutError:
                if not alive():
                    log.warning("process of pidfd %d ended unreported by the event loop", fd)
                    return
    finally:
        loop.remove_reader(own)
        os.close(own)


def spawn(
    argv: Sequence[str],
    *,
    stdout: int,
    stderr: int,
    cwd: Path,
    pass_fds: Sequence[int] = (),
    gated: bool = False,
    user: VMMUser | None = None,
) -> SupervisedProcess:
    """Start ``argv`` in a new session with the given output fds and no stdin; ``pass_fds``
    are inherited under the same numbers. ``gated``: the program only runs once the returned
    process is ``release``d (see the module docstring). ``user``: the program runs as that user
    with only its groups, entering ``cwd`` first (so it may be root's); None: as the plugin."""
    command = list(argv)
    gate_read = gate_write = None
    if user is not None:
        # setpriv (util-linux) changes user in the child's exec chain: a Popen that changed
        # users itself would fork() instead of vfork(), and gRPC's fork handlers crash the
        # child of a threaded plugin.
        command = user.switch_argv(command)
    if gated:
        command = [GATE_SHELL, "-c", GATE_SCRIPT, GATE_NAME, *command]
        gate_read, gate_write = os.pipe()
    try:
        popen = subprocess.Popen(
            command,
            stdin=gate_read if gate_read is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    except OSError as exc:
        if gate_write is not None:
            os.close(gate_write)
        raise LaunchError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    finally:
        if gate_read is not None:
            os.close(gate_read)
    # Our child cannot be reaped before we wait for it, so its /proc entry is there to read.
    ident = identity_of(popen.pid)
    if ident is None:
        popen.kill()
        popen.wait()
        if gate_write is not None:
            os.close(gate_write)
        raise LaunchError(f"cannot read the identity of {argv[0]} (pid {popen.pid})")
    return SupervisedProcess(ident, popen, gate_write)


def reattach(ident: ProcessIdentity) -> SupervisedProcess:
    """Find a VMM started by an earlier plugin process; HypervisorError if it is gone."""
    if not is_same_process(ident):
        raise HypervisorError(
            f"process {ident.pid} (started {ident.start_ticks} ticks after boot) is not running "
            "(it ended, or the pid now belongs to another process)"
        )
    return SupervisedProcess(ident, None)


def end_processes(idents: Sequence[ProcessIdentity], timeout: float = 10.0) -> list[int]:
    """SIGKILL each process still running under its identity and wait (up to ``timeout`` in
    all) until they have ended, so that what they held (a TAP, files) is free afterwards.
    Returns the pids that outlived the wait (a process stuck in the kernel)."""
    waiting: dict[int, ProcessIdentity] = {}
    for ident in idents:
        if not is_same_process(ident):
            continue
        try:
            pidfd = os.pidfd_open(ident.pid)
        except OSError:
            continue  # gone in between
        if not is_same_process(ident):  # the pid was recycled just before we opened it
            os.close(pidfd)
            continue
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        waiting[pidfd] = ident
    try:
        poller = select.poll()
        for pidfd in waiting:
            poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        pending = set(waiting)
        while pending and (left := deadline - time.monotonic()) > 0:
            for pidfd, _ in poller.poll(left * 1000):
                pending.discard(pidfd)
                poller.unregister(pidfd)
        return [waiting[pidfd].pid for pidfd in pending]
    finally:
        for pidfd in waiting:
            os.close(pidfd)

"""A TPM 2.0 for one VM: one swtpm (Debian's ``swtpm`` package) per task, started before QEMU.

swtpm runs as ``vm_user`` like the other helpers and needs no path of the plugin's:

* its state directory (``--tpmstate dir=``) is a descriptor of the task's TPM state
  directory (``driver/tpm_state.py`` makes it, owned by vm_user, in the task's own
  directory so the TPM's keys and counters outlive a restart of the task in the same
  allocation), reached as ``/proc/self/fd/N``;
* its control channel is a socket the plugin binds in the runtime directory and hands over
  listening (``--ctrl type=unixio,fd=N``); QEMU gets a client already connected to it, which
  waits in the backlog until swtpm accepts (the same as a virtiofsd's vhost-user socket), so
  neither reaches the socket's path. QEMU's TPM emulator passes swtpm the data channel over
  that control connection (a socketpair of its own), so there is no second socket;
* ``--terminate``: swtpm exits when QEMU closes the control connection, so it ends with its
  VM whoever stopped it; the driver's journal names it (a helper), so a plugin that died
  meanwhile still ends it.

No endorsement key certificate is made (that needs ``swtpm_setup`` and a local CA): the
guest's TPM works (PCRs, keys, sealing) but has no EK certificate in its NV storage.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.executables import find_executable
from nomad_vm.files import read_log_tail
from nomad_vm.vm.handover import connect_to, fd_path, listen_at
from nomad_vm.vm.process import SupervisedProcess, spawn
from nomad_vm.vm.vmm_user import VMMUser

SWTPM = "swtpm"
SWTPM_PACKAGE = "swtpm"
ROLE = "swtpm"
CONTROL_SOCKET = "swtpm.sock"
LOG_NAME = "swtpm.log"


@dataclass(frozen=True)
class TpmDaemon:
    """A running swtpm and QEMU's end of its control connection (closed once QEMU has its
    own copy: ``close``)."""

    process: SupervisedProcess
    qemu_end: socket.socket
    log: Path

    def close(self) -> None:
        self.qemu_end.close()

    def early_exit_report(self) -> str:
        """swtpm's own words when it ended before QEMU connected ("" while it runs)."""
        code = self.process.poll()
        if code is None:
            return ""
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"swtpm {how} before QEMU connected: {read_log_tail(self.log) or 'no output'}"


def find_swtpm() -> Path:
    """swtpm on PATH; HypervisorError naming the package when it is missing."""
    return find_executable(
        None, SWTPM, "swtpm", f"a TPM needs it: install the Debian package '{SWTPM_PACKAGE}'"
    )


def swtpm_argv(binary: Path, state_fd: int, control_fd: int, log_fd: int) -> list[str]:
    """The command line (a pure function): TPM 2.0, state in the handed directory, control
    channel on the handed listening socket, messages to the handed log."""
    return [
        str(binary),
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={fd_path(state_fd)},mode=0600",
        "--ctrl",
        f"type=unixio,fd={control_fd}",
        "--log",
        f"fd={log_fd},level=1",
        "--terminate",
    ]


def start_swtpm(
    binary: Path, state_fd: int, runtime_dir: Path, user: VMMUser | None
) -> TpmDaemon:
    """swtpm forked at its gate (released once the journal knows it), listening on the
    control socket in ``runtime_dir``; the returned daemon holds QEMU's connected end."""
    listener = listen_at(runtime_dir / CONTROL_SOCKET)
    qemu_end = None
    log = runtime_dir / LOG_NAME
    try:
        qemu_end = connect_to(listener)
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except (OSError, HypervisorError) as exc:
        listener.close()
        if qemu_end is not None:
            qemu_end.close()
        raise HypervisorError(f"cannot set up swtpm: {exc}") from exc
    try:
        argv = swtpm_argv(binary, state_fd, listener.fileno(), log_fd)
        process = spawn(
            argv,
            stdout=log_fd,
            stderr=log_fd,
            # vm_user cannot enter the runtime dir; swtpm uses no relative path.
            cwd=Path("/"),
            pass_fds=[state_fd, listener.fileno(), log_fd],
            gated=True,
            user=user,
        )
        return TpmDaemon(process, qemu_end, log)
    except BaseException:
        qemu_end.close()
        raise
    finally:
        # swtpm has its own copies now.
        listener.close()
        os.close(log_fd)

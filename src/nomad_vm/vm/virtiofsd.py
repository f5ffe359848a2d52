"""virtio-fs daemons: one virtiofsd per share, started before QEMU.

Which binary (and whether virtio-fs at all) is decided by nomad_vm.vm.share_transport. Each daemon
gets a listening socket the driver has already bound (``--fd``), so QEMU can connect the moment it
starts, with no wait for the daemon to create its socket. A daemon serves exactly one connection
and exits when QEMU closes it, so daemons end with their VM, whoever stopped it. One that exits
before QEMU connects (bad options, a sandbox it cannot set up) leaves QEMU with "Connection
refused": ``early_exit_report`` turns that into the daemon's own words from its log.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.files import read_log_tail
from nomad_vm.vm.process import SupervisedProcess, spawn
from nomad_vm.vm.spec import ShareSpec


@dataclass(frozen=True)
class ShareDaemon:
    """A running virtiofsd, the share it serves and where its messages go."""

    process: SupervisedProcess
    share: ShareSpec
    log: Path


def with_sockets(shares: Sequence[ShareSpec], runtime_dir: Path) -> tuple[ShareSpec, ...]:
    """Each share's vhost-user socket, in the task's runtime directory."""
    return tuple(replace(s, socket=runtime_dir / f"vfs{i}.sock") for i, s in enumerate(shares))


def daemon_argv(binary: Path, share: ShareSpec, listen_fd: int) -> list[str]:
    argv = [
        str(binary),
        f"--fd={listen_fd}",
        f"--shared-dir={share.host_path}",
        f"--tag={share.tag}",
        # Root can confine the daemon to the shared directory in namespaces of its own.
        f"--sandbox={'namespace' if os.geteuid() == 0 else 'none'}",
        "--cache=auto",
    ]
    if share.readonly:
        argv.append("--readonly")
    return argv


def start_daemons(
    binary: Path, shares: tuple[ShareSpec, ...], runtime_dir: Path, *, gated: bool = False
) -> list[ShareDaemon]:
    """One virtiofsd per share, each already listening on ``share.socket``; all or none.
    ``gated``: each runs only once its process is released (``nomad_vm.vm.process``)."""
    started: list[ShareDaemon] = []
    try:
        for i, share in enumerate(shares):
            log = runtime_dir / f"virtiofsd-{i}.log"
            started.append(_start_one(binary, share, log, gated))
    except BaseException:
        kill_daemons(started)
        raise
    return started


def _start_one(binary: Path, share: ShareSpec, log: Path, gated: bool) -> ShareDaemon:
    if share.socket is None:
        raise ValueError(f"share {share.tag} has no vhost-user socket path")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        share.socket.unlink(missing_ok=True)
        listener.bind(str(share.socket))
        listener.listen(1)
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        listener.close()
        raise HypervisorError(f"cannot set up virtiofsd for {share.host_path}: {exc}") from exc
    try:
        fd = listener.fileno()
        argv = daemon_argv(binary, share, fd)
        process = spawn(
            argv, stdout=log_fd, stderr=log_fd, cwd=log.parent, pass_fds=[fd], gated=gated
        )
        return ShareDaemon(process, share, log)
    finally:
        # The daemon has its own copy of the listening socket now.
        listener.close()
        os.close(log_fd)


def kill_daemons(daemons: list[ShareDaemon]) -> None:
    """SIGKILL and reap them (a start that failed: their VM never ran, nothing to flush)."""
    for daemon in daemons:
        daemon.process.kill_and_reap()


def early_exit_report(daemons: list[ShareDaemon]) -> str:
    """Which daemons have failed (so QEMU could not connect to them), in their own words; empty
    when none has. A daemon that exited 0 only saw QEMU go away, which is not a cause."""
    reports = []
    for daemon in daemons:
        code = daemon.process.poll()
        if not code:
            continue
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        said = read_log_tail(daemon.log) or "no output"
        reports.append(
            f"virtiofsd for {daemon.share.host_path} {how} before QEMU connected: {said}"
        )
    return "; ".join(reports)

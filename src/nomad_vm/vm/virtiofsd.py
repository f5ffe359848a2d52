"""virtio-fs daemons: one virtiofsd per share, started before QEMU.

Which binary (and whether virtio-fs at all) is decided by nomad_vm.vm.share_transport. Each daemon
gets a listening socket the driver has already bound (``--fd``), and QEMU gets a client already
connected to it (``qemu_end``, waiting in the backlog until the daemon accepts): neither needs to
reach the socket's path in the root-owned runtime directory, and QEMU needs no wait for the
daemon to create its socket. A daemon runs as ``vm_user`` (nomad_vm.vm.vmm_user) with
``--sandbox=none`` (the namespace sandbox needs root), so it reads and writes the share with
that user's permissions only; as root it confines itself with ``--sandbox=namespace``.

A daemon serves exactly one connection and exits when QEMU closes it, so daemons end with their
VM, whoever stopped it. One that exits
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
from nomad_vm.vm.handover import connect_to, fd_path, listen_at
from nomad_vm.vm.process import SupervisedProcess, spawn
from nomad_vm.vm.spec import ShareSpec
from nomad_vm.vm.vmm_user import VMMUser


@dataclass(frozen=True)
class ShareDaemon:
    """A running virtiofsd, the share it serves and where its messages go."""

    process: SupervisedProcess
    share: ShareSpec
    log: Path
    # The VMM's end of the vhost-user connection, when asked for (``connect``); closed once
    # the VMM has its copy (``close``).
    qemu_end: socket.socket | None = None

    def close(self) -> None:
        if self.qemu_end is not None:
            self.qemu_end.close()


def with_sockets(shares: Sequence[ShareSpec], runtime_dir: Path) -> tuple[ShareSpec, ...]:
    """Each share's vhost-user socket, in the task's runtime directory."""
    return tuple(replace(s, socket=runtime_dir / f"vfs{i}.sock") for i, s in enumerate(shares))


def daemon_argv(
    binary: Path, share: ShareSpec, listen_fd: int, as_root: bool | None = None
) -> list[str]:
    """``as_root``: the daemon runs as root (None: as the plugin, whatever that is)."""
    if as_root is None:
        as_root = os.geteuid() == 0
    argv = [
        str(binary),
        f"--fd={listen_fd}",
        f"--shared-dir={share_root(share)}",
        f"--tag={share.tag}",
        # Root can confine the daemon to the shared directory in namespaces of its own.
        f"--sandbox={'namespace' if as_root else 'none'}",
        "--cache=auto",
        # Inodes as O_PATH descriptors, never file handles: handles need each submount's mount
        # point opened by path (Nomad's secrets/ is a tmpfs), which vm_user cannot reach in
        # Nomad's 0700 data_dir, and CAP_DAC_READ_SEARCH, which it does not have.
        "--inode-file-handles=never",
    ]
    if share.readonly:
        argv.append("--readonly")
    return argv


def share_root(share: ShareSpec) -> str:
    """The shared directory as the daemon names it: the descriptor the driver opened, when
    there is one (see nomad_vm.vm.handover), else its path. The trailing "/." matters: the
    daemon opens its root with O_NOFOLLOW, which on the bare /proc/self/fd/N would open the
    magic link itself (a root on /proc, where every read fails with EIO)."""
    if share.host_fd is None:
        return str(share.host_path)
    return f"{fd_path(share.host_fd)}/."


def start_daemons(
    binary: Path,
    shares: tuple[ShareSpec, ...],
    runtime_dir: Path,
    *,
    gated: bool = False,
    user: VMMUser | None = None,
    connect: bool = False,
) -> list[ShareDaemon]:
    """One virtiofsd per share, each already listening on ``share.socket``; all or none.
    ``gated``: each runs only once its process is released (``nomad_vm.vm.process``);
    ``user``: who it runs as (None: as the plugin); ``connect``: each gets a client already
    connected (``qemu_end``), for a VMM that cannot reach the socket's path."""
    started: list[ShareDaemon] = []
    try:
        for i, share in enumerate(shares):
            log = runtime_dir / f"virtiofsd-{i}.log"
            started.append(_start_one(binary, share, log, gated, user, connect))
    except BaseException:
        kill_daemons(started)
        raise
    return started


def _start_one(
    binary: Path, share: ShareSpec, log: Path, gated: bool, user: VMMUser | None, connect: bool
) -> ShareDaemon:
    if share.socket is None:
        raise ValueError(f"share {share.tag} has no vhost-user socket path")
    listener = listen_at(share.socket)
    qemu_end = None
    try:
        qemu_end = connect_to(listener) if connect else None
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except (OSError, HypervisorError) as exc:
        listener.close()
        if qemu_end is not None:
            qemu_end.close()
        raise HypervisorError(f"cannot set up virtiofsd for {share.host_path}: {exc}") from exc
    try:
        fd = listener.fileno()
        as_root = os.geteuid() == 0 and user is None
        argv = daemon_argv(binary, share, fd, as_root)
        process = spawn(
            argv,
            stdout=log_fd,
            stderr=log_fd,
            # Not the runtime dir: as vm_user the daemon could not enter it, and it resolves
            # its shared directory against its working directory.
            cwd=Path("/"),
            pass_fds=[fd] if share.host_fd is None else [fd, share.host_fd],
            gated=gated,
            user=user,
        )
        return ShareDaemon(process, share, log, qemu_end)
    except BaseException:
        if qemu_end is not None:
            qemu_end.close()
        raise
    finally:
        # The daemon has its own copy of the listening socket now.
        listener.close()
        os.close(log_fd)


def kill_daemons(daemons: list[ShareDaemon]) -> None:
    """SIGKILL and reap them (a start that failed: their VM never ran, nothing to flush)."""
    for daemon in daemons:
        daemon.process.kill_and_reap()
        daemon.close()


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

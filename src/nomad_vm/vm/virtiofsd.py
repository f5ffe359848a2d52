"""virtio-fs shares: finding virtiofsd, choosing the transport, and one daemon per share.

virtio-fs is faster than 9p and gives the guest real POSIX semantics, but needs a vhost-user
daemon (virtiofsd) per shared directory and guest memory QEMU can share with it. Debian 12 does not
package virtiofsd; `make setup` builds it from crates.io into .tools/bin. Without it the driver
falls back to 9p (``share_transport = "auto"``).

Each daemon gets a listening socket the driver has already bound (``--fd``), so QEMU can connect
the moment it starts, with no wait for the daemon to create its socket. A daemon serves exactly one
connection and exits when QEMU closes it, so daemons end with their VM, whoever stopped it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.executables import find_executable
from nomad_vm.schema import SHARE_TRANSPORTS
from nomad_vm.vm.process import SupervisedProcess, spawn
from nomad_vm.vm.spec import ShareSpec

VIRTIOFSD = "virtiofsd"
VIRTIOFSD_HINT = (
    "run `make setup` (cargo install virtiofsd) or set virtiofsd_binary in the plugin config"
)
# Where distributions that package it put it (it is not on PATH there).
LIBEXEC_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")


@dataclass(frozen=True)
class ShareTransport:
    name: str  # "virtiofs" or "9p"
    virtiofsd: Path | None
    reason: str


def find_virtiofsd(configured: str | None) -> Path:
    return find_executable(
        configured, VIRTIOFSD, "virtiofsd_binary", VIRTIOFSD_HINT, fallbacks=LIBEXEC_PATHS
    )


def choose_share_transport(requested: str, configured_binary: str | None) -> ShareTransport:
    """``auto``: virtio-fs when virtiofsd is found, else 9p. ``virtiofs`` without virtiofsd is
    a configuration error (the node reports itself unhealthy with this message)."""
    if requested not in SHARE_TRANSPORTS:
        choices = ", ".join(SHARE_TRANSPORTS)
        raise ConfigError("config.share_transport", f"{requested!r} is not one of {choices}")
    if requested == "9p":
        return ShareTransport("9p", None, "share_transport = 9p")
    try:
        binary = find_virtiofsd(configured_binary)
    except HypervisorError as exc:
        if configured_binary and configured_binary.strip():
            # An operator who named a binary wants that one: a wrong path is an error, not 9p.
            raise ConfigError("config.virtiofsd_binary", str(exc)) from None
        if requested == "virtiofs":
            reason = f"virtiofs needs virtiofsd: {exc}"
            raise ConfigError("config.share_transport", reason) from None
        return ShareTransport("9p", None, f"9p because {exc}")
    return ShareTransport("virtiofs", binary, f"virtio-fs with {binary}")


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
    binary: Path, shares: tuple[ShareSpec, ...], runtime_dir: Path
) -> list[SupervisedProcess]:
    """One virtiofsd per share, each already listening on ``share.socket``; all or none."""
    started: list[SupervisedProcess] = []
    try:
        for i, share in enumerate(shares):
            log = runtime_dir / f"virtiofsd-{i}.log"
            started.append(_start_one(binary, share, log))
    except BaseException:
        kill_daemons(started)
        raise
    return started


def _start_one(binary: Path, share: ShareSpec, log: Path) -> SupervisedProcess:
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
        return spawn(argv, stdout=log_fd, stderr=log_fd, cwd=log.parent, pass_fds=[fd])
    finally:
        # The daemon has its own copy of the listening socket now.
        listener.close()
        os.close(log_fd)


def kill_daemons(daemons: list[SupervisedProcess]) -> None:
    """SIGKILL and reap them (a start that failed: their VM never ran, nothing to flush)."""
    for daemon in daemons:
        daemon.kill_and_reap()

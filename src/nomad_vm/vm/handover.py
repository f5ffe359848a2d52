"""Sockets and directories the plugin opens and hands to an unprivileged VMM as descriptors.

The VMM and its share daemons run as ``vm_user`` and may not create or even reach anything in
the task's runtime directory (root's, mode 0700), nor traverse the directories above a share
(Nomad's data_dir may be 0700). So the plugin binds the sockets QEMU would listen on (QMP, the
guest agent's port, terminal ports) and passes the listening descriptors; for a vhost-user
share it also connects QEMU's end to the share daemon's listener; and it opens each shared
directory, which the VMM reaches as ``/proc/self/fd/N`` (only that directory's own permissions
apply, and a path swapped after the open changes nothing). Socket paths stay where the plugin
(root) finds them again after a restart. Every descriptor here is close-on-exec: a child only
gets the ones its spawn names in ``pass_fds``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from nomad_vm.errors import HypervisorError


def listen_at(path: Path, backlog: int = 1) -> socket.socket:
    """A socket listening at ``path`` (replacing a stale one); the caller closes it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        raise HypervisorError(f"cannot listen at {path}: {exc}") from exc
    return listener


def connect_to(listener: socket.socket) -> socket.socket:
    """A client connected to ``listener``, waiting in its backlog until the server (a share
    daemon not yet running) accepts: QEMU gets it as an already-connected chardev."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(listener.getsockname())
    except OSError as exc:
        client.close()
        raise HypervisorError(f"cannot connect to {listener.getsockname()}: {exc}") from exc
    return client


def fd_path(fd: int) -> str:
    """How a process that inherited ``fd`` under the same number names what it refers to."""
    return f"/proc/self/fd/{fd}"


class Handover:
    """The descriptors of one launch; closed in the plugin once the VMM holds its copies."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        self._fds: list[int] = []

    def listen(self, path: Path) -> int:
        """A socket listening at ``path``, for the VMM to serve."""
        sock = listen_at(path)
        self._sockets.append(sock)
        return sock.fileno()

    def directory(self, path: Path) -> int:
        """``path`` opened as a directory (O_PATH: no read access needed by the plugin)."""
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise HypervisorError(f"cannot open shared directory {path}: {exc.strerror}") from exc
        self._fds.append(fd)
        return fd

    def output_file(self, path: Path) -> int:
        """``path`` created (or emptied) by the plugin, mode 0600, opened for the VMM to write
        (Cloud Hypervisor's event monitor): the plugin reads it by name, the VMM never opens it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise HypervisorError(f"cannot create {path}: {exc.strerror}") from exc
        self._fds.append(fd)
        return fd

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self._sockets] + self._fds

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        for fd in self._fds:
            os.close(fd)
        self._sockets.clear()
        self._fds.clear()


@contextlib.contextmanager
def handover() -> Iterator[Handover]:
    handed = Handover()
    try:
        yield handed
    finally:
        handed.close()

"""The plugin's control socket (``nomad_vm.control.protocol``): list, info, pause, resume,
snapshot.

Served by the plugin process that Nomad uses, from its first fingerprint, start or recovery on:
not by the short-lived launches Nomad makes only to validate the config (they get SetConfig
too, and one of them taking over the socket would leave it to a process about to exit).

Root-only three ways: the directory is 0700, the socket 0600 (bound under a umask, so it never
exists with wider permissions), and each connection's peer uid (SO_PEERCRED) must be the
plugin's own. The VMs' processes run as the unprivileged vm_user and their guests reach no
host socket at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

from nomad_vm.control.protocol import (
    MAX_REQUEST,
    ProtocolError,
    Request,
    decode_request,
    encode,
)
from nomad_vm.driver.pause import pause_task, resume_task
from nomad_vm.driver.snapshot_tasks import snapshot_now
from nomad_vm.driver.task import VMTask
from nomad_vm.driver.vm_view import details, find_task, summary
from nomad_vm.errors import NomadVMError

log = logging.getLogger(__name__)

# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")


class ControlServer:
    def __init__(
        self,
        path: Path,
        tasks: Callable[[], Mapping[str, VMTask]],
        snapshot_key: Callable[[], bytes],
    ) -> None:
        self.path = path
        self._tasks = tasks
        self._snapshot_key = snapshot_key
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        # Open connections, closed with the server: a client that keeps its connection open
        # must not hold up the plugin's shutdown (wait_closed waits for every connection).
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if len(str(self.path)) > MAX_SOCKET_PATH:
            raise NomadVMError(
                f"the control socket path {self.path} is longer than a unix socket can be: "
                "choose a shorter data_dir"
            )
        _private_directory(self.path.parent)
        # A socket left by a plugin that was killed: nobody serves it any more.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        self._inode = self.path.stat().st_ino
        self._server = await asyncio.start_unix_server(
            self._serve, sock=listener, limit=MAX_REQUEST
        )
        log.info("control socket: %s", self.path)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._clients):
            writer.close()
        # Only our own socket: a newer plugin may have bound a new one in its place.
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            if self._server is None:
                return  # accepted just as the server closed: close it too
            if not _peer_allowed(writer):
                writer.write(encode({"ok": False, "error": "permission denied"}))
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_REQUEST
                    writer.write(encode({"ok": False, "error": "request too long"}))
                    return
                if not line:
                    return
                writer.write(encode(await self._answer(line)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._clients.discard(writer)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, object]:
        try:
            return {"ok": True, "result": await self._handle(decode_request(line))}
        except (ProtocolError, NomadVMError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the socket must outlive any one request's failure
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    async def _handle(self, request: Request) -> object:
        tasks = dict(self._tasks())
        if request.op == "list":
            return [await summary(entry) for _, entry in sorted(tasks.items())]
        entry = find_task(tasks, request.task)
        if request.op == "pause":
            await pause_task(entry)
        elif request.op == "resume":
            await resume_task(entry)
        elif request.op == "snapshot":
            saved = await snapshot_now(entry, self._snapshot_key)
            return {**saved, "vm": await details(entry)}
        return await details(entry)


def _private_directory(path: Path) -> None:
    """``path`` as a 0700 directory of ours (made, or a leftover checked and tightened)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise NomadVMError(f"{path} is not a directory of the plugin's user: not serving in it")
    os.chmod(path, 0o700)


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return bool(uid == os.geteuid())


class ControlService:
    """The driver's control socket: served at the data_dir's path once the driver is in use,
    moved when the data_dir changes, closed with the driver. A failure to serve is logged and
    never fails the driver's own work (VMs run without an operator view)."""

    def __init__(
        self, tasks: Callable[[], Mapping[str, VMTask]], snapshot_key: Callable[[], bytes]
    ) -> None:
        self._tasks = tasks
        self._snapshot_key = snapshot_key
        self._server: ControlServer | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, path: Path) -> None:
        async with self._lock:
            if self._server is not None and self._server.path == path:
                return
            await self._close()
            server = ControlServer(path, self._tasks, self._snapshot_key)
            try:
                await server.start()
            except (OSError, NomadVMError) as exc:
                log.warning("not serving the control socket %s: %s", path, exc)
                return
            self._server = server

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

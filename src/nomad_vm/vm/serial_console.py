"""The plugin's end of a VM's serial console: one connection, shared by every attached session.

The VMM serves the console on a unix socket (QEMU: ``argv.serial_argv``) and takes one client at
a time, so the plugin holds at most one connection per VM and fans it out: every byte the guest
writes goes to every attachment, and what any attachment sends goes to the guest (shared input,
as in a shared screen session). The connection is made when the first session attaches and
dropped when the last one detaches: the console's copy in the task's stdout is written by the
VMM itself, so nothing here is needed for `nomad alloc logs`, and a plugin restart loses only
the sessions (a new plugin connects again on the next attach).

Each attachment buffers at most ``OUTPUT_LIMIT`` bytes that its reader has not taken yet; one
that falls further behind is ended with a reason instead of slowing the guest (or the other
sessions) down, or growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path

from nomad_vm.errors import HypervisorError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20
READ_SIZE = 65536
CONNECT_TIMEOUT = 10.0
CONSOLE_CLOSED = "the VM's serial console closed (the VM stopped)"
TOO_SLOW = "this session fell more than 1 MiB behind the console's output"
PLUGIN_CLOSING = "the plugin is letting go of the VM (it keeps running)"


class Attachment:
    """One session's view of the console: the output since it attached, then why it ended."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._ready = asyncio.Event()
        self.ended_because: str | None = None

    def push(self, data: bytes) -> None:
        if self.ended_because is not None:
            return
        if self._size + len(data) > self._limit:
            self.end(TOO_SLOW)
            return
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()

    def end(self, reason: str) -> None:
        if self.ended_because is None:
            self.ended_because = reason
        self._ready.set()

    async def output(self) -> bytes | None:
        """The next output (what was buffered, joined); None once ended and drained."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._size = 0
                return data
            if self.ended_because is not None:
                return None
            self._ready.clear()
            await self._ready.wait()


class SerialConsole:
    """The console of one VM, served at ``socket`` by its VMM."""

    def __init__(self, socket: Path, limit: int = OUTPUT_LIMIT) -> None:
        self.socket = socket
        self._limit = limit
        self._attachments: list[Attachment] = []
        self._lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def attached(self) -> int:
        return len(self._attachments)

    async def attach(self) -> Attachment:
        """A new attachment, connecting first when it is the only one."""
        async with self._lock:
            if self._writer is None:
                await self._connect()
            attachment = Attachment(self._limit)
            self._attachments.append(attachment)
            return attachment

    async def detach(self, attachment: Attachment) -> None:
        """Let go of ``attachment``; the last one out closes the connection (the VM keeps
        running and its output keeps going to the task's stdout)."""
        async with self._lock:
            attachment.end("detached")
            with contextlib.suppress(ValueError):
                self._attachments.remove(attachment)
            if not self._attachments:
                await self._disconnect()

    async def write(self, data: bytes) -> None:
        """Input for the guest. HypervisorError when the console is gone."""
        writer = self._writer
        if writer is None:
            raise HypervisorError(CONSOLE_CLOSED)
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            raise HypervisorError(f"{CONSOLE_CLOSED}: {exc}") from exc

    async def close(self) -> None:
        """End every attachment and drop the connection (the plugin lets go of the VM)."""
        async with self._lock:
            for attachment in self._attachments:
                attachment.end(PLUGIN_CLOSING)
            self._attachments.clear()
            await self._disconnect()

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket)), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise HypervisorError(f"cannot connect to the VM's serial console: {exc}") from exc
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader), name=f"console {self.socket}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Fan the guest's output out until the VMM closes the console."""
        try:
            while chunk := await reader.read(READ_SIZE):
                for attachment in self._attachments:
                    attachment.push(chunk)
        except (ConnectionError, OSError) as exc:
            log.info("the serial console at %s failed: %s", self.socket, exc)
        for attachment in self._attachments:
            attachment.end(CONSOLE_CLOSED)
        # The next attach connects again (and fails clearly when the VM is gone).
        writer, self._writer, self._reader_task = self._writer, None, None
        if writer is not None:
            writer.close()

    async def _disconnect(self) -> None:
        task, self._reader_task = self._reader_task, None
        writer, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

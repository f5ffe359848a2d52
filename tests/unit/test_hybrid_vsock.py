"""The guest agent client through a hybrid vsock, as Cloud Hypervisor's host side works (its
docs/vsock.md): a unix socket that takes ``CONNECT <port>\\n``, answers ``OK <host port>\\n``
and then carries the guest's stream, or closes the connection when nothing in the guest
listens on that port. The fake VMM here relays to the fake qemu-ga of test_guest_agent.py,
as CH relays to the guest's vsock listener."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from nomad_vm.vm.guest_agent import AgentUnavailable, GuestAgent
from nomad_vm.vm.hybrid_vsock import HybridVsockRefused, open_hybrid_vsock
from tests.unit.test_guest_agent import FakeAgent

PORT = 7070


class FakeHybridVsock:
    """The VMM's side: guest ports that listen (``listeners``: port -> the unix socket of the
    guest program behind it) and what each host connection asked for."""

    def __init__(self, path: Path, listeners: dict[int, Path], answer: bytes = b"") -> None:
        self.path = path
        self.listeners = listeners
        # Overrides the OK line (a VMM that says something else).
        self.answer = answer
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeHybridVsock:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.requests.append(line)
        words = line.split()
        guest = self.listeners.get(int(words[1])) if len(words) == 2 else None
        if guest is None:
            writer.close()  # the guest refused the vsock connection
            return
        if self.answer:
            writer.write(self.answer)
            writer.close()
            return
        guest_reader, guest_writer = await asyncio.open_unix_connection(str(guest))
        writer.write(b"OK 1073741824\n")
        await asyncio.gather(_pipe(reader, guest_writer), _pipe(guest_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def test_the_agent_answers_through_the_handshake(short_tmp: Path) -> None:
    async def run() -> list[bytes]:
        async with (
            FakeAgent(short_tmp / "ga.sock") as agent,
            FakeHybridVsock(short_tmp / "vsock.sock", {PORT: agent.path}) as vmm,
        ):
            async with GuestAgent(short_tmp / "vsock.sock", vsock_port=PORT) as client:
                await client.ping()
                result = await client.exec(["/bin/true"], timeout=5)
            assert result.exit_code == 0
            assert agent.commands("guest-exec")[0]["path"] == "/bin/true"
            return vmm.requests

    assert asyncio.run(run()) == [b"CONNECT 7070\n"]


def test_no_listener_on_the_port_is_the_agent_being_unavailable(short_tmp: Path) -> None:
    async def run() -> None:
        async with FakeHybridVsock(short_tmp / "vsock.sock", {}):
            client = GuestAgent(short_tmp / "vsock.sock", vsock_port=PORT)
            with pytest.raises(AgentUnavailable, match="port 7070 in the guest is not accepting"):
                await client.connect()
            await client.close()

    asyncio.run(run())


def test_an_answer_other_than_ok_is_refused_and_what_follows_ok_is_the_guests(
    short_tmp: Path,
) -> None:
    async def run() -> None:
        socket = short_tmp / "vsock.sock"
        async with FakeHybridVsock(socket, {PORT: socket}, answer=b"ERR busy\n"):
            with pytest.raises(HybridVsockRefused, match="ERR busy"):
                await open_hybrid_vsock(socket, PORT)
        # The guest's first bytes may come in the same read as the VMM's OK line.
        async with FakeHybridVsock(socket, {PORT: socket}, answer=b"OK 42\nguest's"):
            reader, writer = await open_hybrid_vsock(socket, PORT)
            assert await reader.read() == b"guest's"
            writer.close()
        with pytest.raises(ValueError, match="out of range"):
            await open_hybrid_vsock(socket, 0)

    asyncio.run(run())

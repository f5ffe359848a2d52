"""A TCP relay from the host's loopback into a network namespace: how a person's browser
reaches the bed's Nomad UI (`make cluster`), without any address of the bed in the host's own
namespace. It listens on 127.0.0.1 only; each connection's other end is a socket made in a
thread that entered the namespace (``network.netns.run_in``), so it connects from there.

    python -m nomad_vm.cluster.relay <netns> <listen port> <target host> <target port>
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

from nomad_vm.network.netns import run_in


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


def _connect_in(netns: str, host: str, port: int) -> socket.socket:
    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=10)

    sock = run_in(netns, connect)
    sock.setblocking(False)
    return sock


async def serve(netns: str, listen_port: int, host: str, port: int) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await asyncio.to_thread(_connect_in, netns, host, port)
        except OSError:
            writer.close()
            return
        inner_reader, inner_writer = await asyncio.open_connection(sock=sock)
        await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main() -> None:
    netns, listen_port, host, port = sys.argv[1:5]
    asyncio.run(serve(netns, int(listen_port), host, int(port)))


if __name__ == "__main__":
    main()

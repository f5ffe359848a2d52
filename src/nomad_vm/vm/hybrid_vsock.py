"""A stream to a port in the guest through a "hybrid vsock": Cloud Hypervisor's (and
Firecracker's) virtio-vsock device, whose host side is a unix socket the VMM listens on.

The host connects to that socket and writes ``CONNECT <port>\\n``; the VMM opens a vsock
connection to that port in the guest and answers ``OK <host port>\\n``, after which the stream
is the guest's. When nothing in the guest listens on the port, the VMM closes the connection
instead (the guest refused it). The VMM's answer is one short line, read with a bound.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from nomad_vm.errors import HypervisorError

# "OK " and a 32-bit port number, then the newline.
_MAX_ANSWER = 32
_OK = re.compile(rb"OK (\d{1,10})\n")


class HybridVsockRefused(HypervisorError):
    """The VMM answered, but not with OK: nothing listens on the port in the guest (yet)."""


async def open_hybrid_vsock(
    socket: Path, port: int, *, limit: int = 2**16, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The guest's stream on vsock ``port`` through the VMM's unix ``socket``. OSError when
    the socket cannot be reached; HybridVsockRefused when the guest does not take it."""
    if not 0 < port < 2**32:
        raise ValueError(f"vsock port {port} is out of range")
    reader, writer = await asyncio.open_unix_connection(str(socket), limit=limit)
    try:
        writer.write(b"CONNECT %d\n" % port)
        await writer.drain()
        async with asyncio.timeout(timeout):
            answer = await _answer_line(reader)
    except BaseException:
        writer.close()
        raise
    if _OK.fullmatch(answer) is None:
        writer.close()
        said = answer.decode("ascii", "replace").strip() or "the connection was closed"
        raise HybridVsockRefused(
            f"vsock port {port} in the guest is not accepting connections ({said})"
        )
    return reader, writer


async def _answer_line(reader: asyncio.StreamReader) -> bytes:
    """The VMM's one line, or what came before end-of-file; never more than _MAX_ANSWER."""
    answer = b""
    while not answer.endswith(b"\n") and len(answer) < _MAX_ANSWER:
        byte = await reader.read(1)  # one at a time: what follows the line is the guest's
        if not byte:
            break
        answer += byte
    return answer

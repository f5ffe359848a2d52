"""The websocket <-> VNC socket relay: noVNC speaks RFB in binary websocket messages, QEMU's
VNC server speaks it on the task's unix socket; bytes are passed as they come, both ways,
until either side ends."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

_CHUNK = 65536


async def relay(ws: web.WebSocketResponse, socket_path: str) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path)
    except OSError:
        await ws.close(code=1011, message=b"the VM's display is not reachable")
        return

    async def to_vm() -> None:
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                writer.write(message.data)
                await writer.drain()
            elif message.type == WSMsgType.TEXT:
                writer.write(message.data.encode("latin-1"))
                await writer.drain()
            else:
                break

    async def from_vm() -> None:
        while data := await reader.read(_CHUNK):
            await ws.send_bytes(data)

    tasks = [asyncio.create_task(to_vm()), asyncio.create_task(from_vm())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await task
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        await ws.close()

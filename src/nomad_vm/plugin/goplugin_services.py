"""go-plugin's own services: GRPCController (Shutdown), GRPCStdio and GRPCBroker.

Nomad opens the stdio and broker streams once on connect and logs "Unimplemented" if they are
missing; it never uses them for drivers, so both are held open doing nothing. Shutdown is how
go-plugin's Kill ends us: without it every plugin kill waits 2 s and then SIGKILLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2

from nomad_vm.plugin.proto import goplugin_pb2, goplugin_pb2_grpc


class ControllerService(goplugin_pb2_grpc.GRPCControllerServicer):
    def __init__(self, request_shutdown: Callable[[], None]) -> None:
        self._request_shutdown = request_shutdown

    async def Shutdown(
        self, request: goplugin_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> goplugin_pb2.Empty:
        # Answer first, then stop: the caller waits for this reply before it closes the channel.
        asyncio.get_running_loop().call_soon(self._request_shutdown)
        return goplugin_pb2.Empty()


class StdioService(goplugin_pb2_grpc.GRPCStdioServicer):
    async def StreamStdio(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[goplugin_pb2.StdioData]:
        await asyncio.Event().wait()  # held open until the client cancels
        yield goplugin_pb2.StdioData()  # pragma: no cover - makes this a generator


class BrokerService(goplugin_pb2_grpc.GRPCBrokerServicer):
    async def StartStream(
        self,
        request_iterator: AsyncIterator[goplugin_pb2.ConnInfo],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[goplugin_pb2.ConnInfo]:
        async for _ in request_iterator:
            pass  # Nomad's driver client never brokers connections
        return
        yield goplugin_pb2.ConnInfo()  # pragma: no cover - makes this a generator

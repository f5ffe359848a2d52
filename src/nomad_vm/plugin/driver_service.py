"""hashicorp.nomad.plugins.drivers.proto.Driver: convert, call the port, convert back."""

from __future__ import annotations

import asyncio
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, TypeAlias

import grpc

from nomad_vm.driver.console_session import is_console_command
from nomad_vm.driver.guest_terminal import TerminalInput
from nomad_vm.driver.types import ExitResult
from nomad_vm.errors import NomadVMError, Unsupported
from nomad_vm.plugin import convert
from nomad_vm.plugin.errors_guard import rpc_errors
from nomad_vm.plugin.exec_frames import (
    EXEC_CHUNK,
    abort_internal,
    exited_frame,
    output_frames,
    refusal_frames,
)
from nomad_vm.plugin.hclspec import schema_spec
from nomad_vm.plugin.proto import driver_pb2 as pb
from nomad_vm.plugin.proto import driver_pb2_grpc

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort

Ctx: TypeAlias = grpc.aio.ServicerContext
log = logging.getLogger(__name__)

# Driver.Shutdown: Nomad's deadline (drivermanager/instance.go driverShutdownTimeout), for a
# caller that sets none, and how long before the deadline to answer. An answer in time keeps
# "context deadline exceeded" out of the agent's log; the close goes on after it either way.
SHUTDOWN_TIMEOUT = 2.0
SHUTDOWN_MARGIN = 0.3
# Output frames (1 KiB each) an interactive session may have waiting for the client.
FRAME_BACKLOG = 64
# An interactive session with no output for this long sends an empty output frame. Nomad tells
# a plugin nothing when the user leaves (`~.`, a closed browser tab: its relay just stops
# reading, plugins/drivers/client.go ExecTaskStreamingRaw) and cancels the stream only when
# forwarding the next output fails; the probe is that output, so a quiet console or shell is
# let go within seconds instead of at the guest's next word. Nomad's CLI and web UI skip
# empty frames.
IDLE_PROBE = 5.0


class Lifecycle(Protocol):
    """What Init and Shutdown act on (plugin/lazy.py's LazyDriver)."""

    async def init(self) -> None: ...

    async def shutdown(self) -> None: ...


class DriverService(driver_pb2_grpc.DriverServicer):
    def __init__(self, driver: DriverPort, lifecycle: Lifecycle) -> None:
        self.driver = driver
        self.lifecycle = lifecycle

    async def Init(self, request: pb.InitRequest, context: Ctx) -> pb.InitResponse:
        """Nomad 2.0.4+: an agent starts using this process (after SetConfig, or when it
        reattaches). An error here makes Nomad kill the plugin and fail the dispense."""
        async with rpc_errors(context, "Init"):
            await self.lifecycle.init()
        return pb.InitResponse()

    async def Shutdown(self, request: pb.ShutdownRequest, context: Ctx) -> pb.ShutdownResponse:
        """Nomad 2.0.4+, on a graceful agent shutdown, after every allocation has stopped or
        been left running, and just before go-plugin's Kill (GRPCController.Shutdown ends this
        process). VMs keep running: the next plugin recovers them. The process keeps serving
        until that Kill: Nomad only skips the Kill for a plugin that has already exited."""
        remaining = context.time_remaining()
        budget = (SHUTDOWN_TIMEOUT if remaining is None else remaining) - SHUTDOWN_MARGIN
        # asyncio.wait, not wait_for: running out of time must not cancel the close.
        closing = asyncio.ensure_future(self.lifecycle.shutdown())
        done, _ = await asyncio.wait({closing}, timeout=max(budget, 0.0))
        if not done:
            log.warning("Shutdown answered while the driver is still closing")
        return pb.ShutdownResponse()

    async def TaskConfigSchema(
        self, request: pb.TaskConfigSchemaRequest, context: Ctx
    ) -> pb.TaskConfigSchemaResponse:
        return pb.TaskConfigSchemaResponse(spec=schema_spec(self.driver.task_config_schema()))

    async def Capabilities(
        self, request: pb.CapabilitiesRequest, context: Ctx
    ) -> pb.CapabilitiesResponse:
        return pb.CapabilitiesResponse(
            capabilities=convert.capabilities(self.driver.capabilities())
        )

    async def Fingerprint(
        self, request: pb.FingerprintRequest, context: Ctx
    ) -> AsyncIterator[pb.FingerprintResponse]:
        # Never ends on its own: Nomad re-calls an ended Fingerprint stream in a tight loop.
        async for fp in self.driver.fingerprints():
            yield convert.fingerprint(fp)

    async def StartTask(self, request: pb.StartTaskRequest, context: Ctx) -> pb.StartTaskResponse:
        async with rpc_errors(context, "StartTask", recoverable_detail=True):
            handle, network = await self.driver.start_task(convert.task_config(request.task))
            response = pb.StartTaskResponse(handle=convert.handle(handle, request.task))
            if network is not None:
                response.network_override.CopyFrom(convert.network_override(network))
            return response
        raise AssertionError("unreachable")  # rpc_errors aborts the RPC on error

    async def RecoverTask(
        self, request: pb.RecoverTaskRequest, context: Ctx
    ) -> pb.RecoverTaskResponse:
        async with rpc_errors(context, "RecoverTask"):
            # Nomad leaves request.task_id empty: the id is in the handle's config.
            task = convert.task_config(request.handle.config)
            await self.driver.recover_task(task, convert.handle_from(request.handle))
        return pb.RecoverTaskResponse()

    async def WaitTask(self, request: pb.WaitTaskRequest, context: Ctx) -> pb.WaitTaskResponse:
        async with rpc_errors(context, "WaitTask"):
            result = await self.driver.wait_task(request.task_id)
            # `result` is always set: Nomad before 1.11.3 panics on a nil result.
            return pb.WaitTaskResponse(result=convert.exit_result(result), err=result.err)
        raise AssertionError("unreachable")

    async def StopTask(self, request: pb.StopTaskRequest, context: Ctx) -> pb.StopTaskResponse:
        async with rpc_errors(context, "StopTask"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            await self.driver.stop_task(request.task_id, timeout, request.signal)
        return pb.StopTaskResponse()

    async def DestroyTask(
        self, request: pb.DestroyTaskRequest, context: Ctx
    ) -> pb.DestroyTaskResponse:
        async with rpc_errors(context, "DestroyTask"):
            await self.driver.destroy_task(request.task_id, request.force)
        return pb.DestroyTaskResponse()

    async def InspectTask(
        self, request: pb.InspectTaskRequest, context: Ctx
    ) -> pb.InspectTaskResponse:
        async with rpc_errors(context, "InspectTask"):
            return convert.task_status(await self.driver.inspect_task(request.task_id))
        raise AssertionError("unreachable")

    async def TaskStats(
        self, request: pb.TaskStatsRequest, context: Ctx
    ) -> AsyncIterator[pb.TaskStatsResponse]:
        interval = request.collection_interval.ToTimedelta().total_seconds() or 1.0
        async with rpc_errors(context, "TaskStats"):
            async for stats in self.driver.task_stats(request.task_id, interval):
                yield convert.task_stats(stats)
        # The VM has ended. Hold the stream open until Nomad cancels it: a closed stream is
        # reopened every interval with an error log.
        await asyncio.Event().wait()

    async def TaskEvents(
        self, request: pb.TaskEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.DriverTaskEvent]:
        async for event in self.driver.task_events():
            yield convert.task_event(event)

    async def SignalTask(
        self, request: pb.SignalTaskRequest, context: Ctx
    ) -> pb.SignalTaskResponse:
        async with rpc_errors(context, "SignalTask"):
            await self.driver.signal_task(request.task_id, request.signal)
        return pb.SignalTaskResponse()

    async def ExecTask(self, request: pb.ExecTaskRequest, context: Ctx) -> pb.ExecTaskResponse:
        async with rpc_errors(context, "ExecTask"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            out = await self.driver.exec_task(request.task_id, list(request.command), timeout)
            result = convert.exit_result(ExitResult(out.exit_code, out.signal, err=out.err))
            # `result` is always set: Nomad dereferences it without a nil check.
            return pb.ExecTaskResponse(stdout=out.stdout, stderr=out.stderr, result=result)
        raise AssertionError("unreachable")

    async def ExecTaskStreaming(
        self, request_iterator: AsyncIterator[pb.ExecTaskStreamingRequest], context: Ctx
    ) -> AsyncIterator[pb.ExecTaskStreamingResponse]:
        """`nomad alloc exec`. Without a tty, stdin is collected until Nomad closes it, then the
        command runs and its output is sent back (the guest agent returns output only at the
        end). With a tty, a pty session in the guest streams both ways (guest_terminal). The
        reserved command ``nomad-vm:console`` streams the VM's serial console both ways, with
        or without a tty (console_session).

        A session that cannot run (no guest agent, VM stopped, command not found, ...) ends like
        a shell's, with the reason as output and exit code 126 or 127: Nomad would not show a
        gRPC error's text (exec_frames). Only bugs end the RPC with an error.
        """
        requests = aiter(request_iterator)
        tty = False
        try:
            first = await anext(requests)
            tty = first.setup.tty
            if tty or is_console_command(first.setup.command):
                session = self._terminal_session(first, requests, tty=tty)
            else:
                session = self._collected_exec(first.setup, requests)
            async for frame in session:
                yield frame
        except NomadVMError as exc:
            log.info("ExecTaskStreaming could not run the command: %s", exc)
            for frame in refusal_frames(exc, tty=tty):
                yield frame
        except Exception:
            log.exception("ExecTaskStreaming failed unexpectedly")
            await abort_internal(context)

    async def _collected_exec(
        self,
        setup: pb.ExecTaskStreamingRequest.Setup,
        requests: AsyncIterator[pb.ExecTaskStreamingRequest],
    ) -> AsyncIterator[pb.ExecTaskStreamingResponse]:
        async def read_stdin() -> bytes:
            data = bytearray()
            async for message in requests:
                data += message.stdin.data
                if message.stdin.close:
                    break
            return bytes(data)

        out = await self.driver.exec_task(setup.task_id, list(setup.command), 0.0, read_stdin)
        stderr = out.stderr + (f"nomad-vm: {out.err}\n".encode() if out.err else b"")
        for frame in output_frames(out.stdout, stderr, tty=False):
            yield frame
        yield exited_frame(out.exit_code, out.signal)

    async def _terminal_session(
        self,
        first: pb.ExecTaskStreamingRequest,
        requests: AsyncIterator[pb.ExecTaskStreamingRequest],
        *,
        tty: bool = True,
    ) -> AsyncIterator[pb.ExecTaskStreamingResponse]:
        # Bounded: a client that reads slowly holds the session's output back (the guest's
        # relay, or the console's per-session limit) instead of growing this queue.
        frames: asyncio.Queue[pb.ExecTaskStreamingResponse] = asyncio.Queue(FRAME_BACKLOG)

        async def on_output(data: bytes) -> None:
            for i in range(0, len(data), EXEC_CHUNK):
                frame = pb.ExecTaskStreamingResponse()
                frame.stdout.data = data[i : i + EXEC_CHUNK]
                await frames.put(frame)

        async def inputs() -> AsyncIterator[TerminalInput]:
            if first.HasField("tty_size"):
                yield TerminalInput(rows=first.tty_size.height, cols=first.tty_size.width)
            async for message in requests:
                yield terminal_input(message)

        setup = first.setup
        session = asyncio.create_task(
            self.driver.exec_terminal(setup.task_id, list(setup.command), inputs(), on_output)
        )
        getter: asyncio.Future[pb.ExecTaskStreamingResponse] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(frames.get())
                done, _ = await asyncio.wait(
                    {getter, session}, timeout=IDLE_PROBE, return_when=FIRST_COMPLETED
                )
                if not done:
                    getter.cancel()
                    yield idle_probe_frame()
                    continue
                if getter not in done:
                    # Cancelling a get that was woken but has not run leaves its frame queued.
                    getter.cancel()
                    break
                yield getter.result()
            while not frames.empty():
                yield frames.get_nowait()
            outcome = await session
        finally:
            session.cancel()
            if getter is not None:
                getter.cancel()
        for frame in output_frames(b"", b"", tty=tty):
            yield frame
        yield exited_frame(outcome.exit_code, outcome.signal)

    async def CreateNetwork(
        self, request: pb.CreateNetworkRequest, context: Ctx
    ) -> pb.CreateNetworkResponse:
        async with rpc_errors(context, "CreateNetwork"):
            raise Unsupported("this driver does not create networks (must_create_network=false)")
        raise AssertionError("unreachable")

    async def DestroyNetwork(
        self, request: pb.DestroyNetworkRequest, context: Ctx
    ) -> pb.DestroyNetworkResponse:
        async with rpc_errors(context, "DestroyNetwork"):
            raise Unsupported("this driver does not create networks (must_create_network=false)")
        raise AssertionError("unreachable")


def idle_probe_frame() -> pb.ExecTaskStreamingResponse:
    """An output frame with no bytes (see IDLE_PROBE)."""
    frame = pb.ExecTaskStreamingResponse()
    frame.stdout.SetInParent()
    return frame


def terminal_input(message: pb.ExecTaskStreamingRequest) -> TerminalInput:
    size = message.tty_size if message.HasField("tty_size") else None
    return TerminalInput(
        data=message.stdin.data,
        rows=size.height if size else 0,
        cols=size.width if size else 0,
        end=message.stdin.close,
    )

"""ExecTaskStreaming's framing over a real grpc.aio server (the driver behind it is a fake), and
guest_exec's refusals, which must come before stdin is read.

Nomad shows a session's output and exit code, but not an exec error's text when it is longer than
a websocket close frame, so refusals must arrive as output plus a shell's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import grpc
import pytest

from nomad_vm import errors
from nomad_vm.driver.guest_exec import ExecOutcome, StdinReader, exec_in_guest
from nomad_vm.driver.guest_terminal import OutputSink, TerminalInput
from nomad_vm.driver.port import DriverPort
from nomad_vm.driver.task import VMTask
from nomad_vm.plugin import driver_service
from nomad_vm.plugin.driver_service import DriverService, Lifecycle
from nomad_vm.plugin.exec_frames import CLOSE_TEXT_LIMIT
from nomad_vm.plugin.proto import driver_pb2 as pb
from nomad_vm.plugin.proto import driver_pb2_grpc
from nomad_vm.plugin.status import classify
from nomad_vm.vm.guest_agent import AgentCommandError, ExecResult, GuestAgent

NO_AGENT = errors.GuestAgentUnavailable(
    "the guest agent does not answer, so commands cannot run in this VM (no answer from the "
    "guest agent within 3s: is qemu-guest-agent installed and running in the guest?); the image "
    "needs qemu-guest-agent installed and running"
)


@dataclass
class FakeDriver:
    """Only the two exec calls; each test gives their behaviour."""

    exec_task_impl: Callable[[StdinReader | None], Awaitable[ExecOutcome]] | None = None
    terminal_impl: Callable[[OutputSink], Awaitable[ExecOutcome]] | None = None
    stdin_seen: list[bytes] = field(default_factory=list)

    async def exec_task(
        self, task_id: str, command: list[str], timeout: float, stdin: StdinReader | None = None
    ) -> ExecOutcome:
        assert self.exec_task_impl is not None
        return await self.exec_task_impl(stdin)

    async def exec_terminal(
        self,
        task_id: str,
        command: list[str],
        inputs: AsyncIterator[TerminalInput],
        on_output: OutputSink,
    ) -> ExecOutcome:
        assert self.terminal_impl is not None
        return await self.terminal_impl(on_output)


@dataclass
class StreamEnd:
    frames: list[pb.ExecTaskStreamingResponse]
    code: grpc.StatusCode
    details: str

    def stream(self, name: Literal["stdout", "stderr"]) -> bytes:
        return b"".join(getattr(f, name).data for f in self.frames if f.HasField(name))

    def closes(self, name: Literal["stdout", "stderr"]) -> int:
        return len([f for f in self.frames if f.HasField(name) and getattr(f, name).close])

    @property
    def exit_code(self) -> int | None:
        exits = [f.result.exit_code for f in self.frames if f.exited]
        assert len(exits) <= 1 and (not exits or self.frames[-1].exited), self.frames
        return exits[0] if exits else None


def run_session(
    driver: FakeDriver,
    *,
    tty: bool,
    stdin: list[bytes] | None = None,
    command: tuple[str, ...] = ("ls",),
) -> StreamEnd:
    """One ExecTaskStreaming call as Nomad makes it: setup, then stdin (closed when ``stdin`` is
    given; with None the client never closes its input, like a user who has not typed ^D)."""

    async def requests() -> AsyncIterator[pb.ExecTaskStreamingRequest]:
        setup = pb.ExecTaskStreamingRequest.Setup(task_id="t1", command=command, tty=tty)
        yield pb.ExecTaskStreamingRequest(setup=setup)
        if stdin is None:
            await asyncio.Event().wait()
        for chunk in stdin or []:
            yield pb.ExecTaskStreamingRequest(stdin=pb.ExecTaskStreamingIOOperation(data=chunk))
        yield pb.ExecTaskStreamingRequest(stdin=pb.ExecTaskStreamingIOOperation(close=True))

    async def main() -> StreamEnd:
        async with serving(driver) as stub:
            frames: list[pb.ExecTaskStreamingResponse] = []
            call = stub.ExecTaskStreaming(requests())
            try:
                async with asyncio.timeout(10):
                    async for frame in call:
                        frames.append(frame)
            except grpc.aio.AioRpcError as exc:
                return StreamEnd(frames, exc.code(), exc.details() or "")
            return StreamEnd(frames, await call.code(), await call.details())

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def serving(driver: FakeDriver) -> AsyncIterator[driver_pb2_grpc.DriverStub]:
    """The servicer on a real grpc.aio server over a unix socket, and a client for it."""
    with tempfile.TemporaryDirectory(prefix="nvx-", dir="/tmp") as tmp:
        socket = Path(tmp) / "s.sock"
        server = grpc.aio.server()
        servicer = DriverService(cast(DriverPort, driver), cast(Lifecycle, driver))
        driver_pb2_grpc.add_DriverServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                yield driver_pb2_grpc.DriverStub(channel)
        finally:
            await server.stop(None)


def refuse(exc: Exception) -> Callable[..., Awaitable[ExecOutcome]]:
    async def impl(*_: Any) -> ExecOutcome:
        raise exc

    return impl


def test_without_tty_output_and_exit_code_pass_through_in_1k_frames() -> None:
    async def impl(stdin: StdinReader | None) -> ExecOutcome:
        assert stdin is not None
        data = await stdin()
        return ExecOutcome(data * 1000, b"err\n", 3)

    end = run_session(FakeDriver(exec_task_impl=impl), tty=False, stdin=[b"a", b"b"])
    assert (end.code, end.exit_code) == (grpc.StatusCode.OK, 3)
    assert end.stream("stdout") == b"ab" * 1000 and end.stream("stderr") == b"err\n"
    assert max(len(f.stdout.data) for f in end.frames) == 1024
    assert (end.closes("stdout"), end.closes("stderr")) == (1, 1)


def test_no_agent_without_tty_is_stderr_and_126_without_waiting_for_stdin() -> None:
    # stdin=None: the client never closes its input; the refusal must not wait for it.
    end = run_session(FakeDriver(exec_task_impl=refuse(NO_AGENT)), tty=False, stdin=None)
    assert (end.code, end.exit_code) == (grpc.StatusCode.OK, 126)
    assert end.stream("stderr") == f"nomad-vm: {NO_AGENT}\n".encode()
    assert end.stream("stdout") == b""
    assert (end.closes("stdout"), end.closes("stderr")) == (1, 1)


def test_command_not_found_exits_127() -> None:
    missing = errors.CommandNotRunnable("nope: command not found in the guest", 127)
    end = run_session(FakeDriver(exec_task_impl=refuse(missing)), tty=False, stdin=[])
    assert end.exit_code == 127
    assert b"nope: command not found in the guest" in end.stream("stderr")


def test_tty_refusal_is_on_stdout_with_crlf_and_126() -> None:
    # The web UI shows only stdout frames, and the CLI's terminal is raw during the session.
    stopped = errors.Unsupported("the VM has stopped; there is nothing to run the command in")
    end = run_session(FakeDriver(terminal_impl=refuse(stopped)), tty=True, stdin=None)
    assert (end.code, end.exit_code) == (grpc.StatusCode.OK, 126)
    assert end.stream("stdout") == f"nomad-vm: {stopped}\r\n".encode()
    assert not any(f.HasField("stderr") for f in end.frames)
    assert end.closes("stdout") == 1


def test_tty_failure_after_output_keeps_the_output_then_the_reason() -> None:
    async def impl(on_output: OutputSink) -> ExecOutcome:
        await on_output(b"partial")
        raise errors.GuestAgentUnavailable("the terminal session in the guest ended")

    end = run_session(FakeDriver(terminal_impl=impl), tty=True, stdin=None)
    assert end.stream("stdout").startswith(b"partial" + b"nomad-vm: the terminal session")
    assert end.exit_code == 126


def test_tty_session_status_passes_through() -> None:
    async def impl(on_output: OutputSink) -> ExecOutcome:
        await on_output(b"x" * 3000)
        return ExecOutcome(b"", b"", 128 + 9, signal=9)

    end = run_session(FakeDriver(terminal_impl=impl), tty=True, stdin=[])
    assert end.stream("stdout") == b"x" * 3000 and end.closes("stdout") == 1
    assert end.exit_code == 137 and end.frames[-1].result.signal == 9


def test_a_long_session_output_arrives_whole_and_in_order_through_the_bounded_queue() -> None:
    # Far more than the frames the servicer keeps waiting for the client (FRAME_BACKLOG).
    chunks = [f"{i:06d}".encode() * 500 for i in range(300)]

    async def impl(on_output: OutputSink) -> ExecOutcome:
        for chunk in chunks:
            await on_output(chunk)
        return ExecOutcome(b"", b"", 0)

    end = run_session(FakeDriver(terminal_impl=impl), tty=True, stdin=None)
    assert end.stream("stdout") == b"".join(chunks)
    assert end.exit_code == 0


def test_the_console_command_streams_without_a_tty_too() -> None:
    async def impl(on_output: OutputSink) -> ExecOutcome:
        await on_output(b"login: ")
        return ExecOutcome(b"", b"", 0)

    end = run_session(
        FakeDriver(terminal_impl=impl), tty=False, stdin=None, command=("nomad-vm:console",)
    )
    assert end.stream("stdout") == b"login: " and end.exit_code == 0
    assert end.closes("stdout") == 1 and end.closes("stderr") == 1


def test_a_quiet_session_probes_the_client_and_ends_when_the_client_has_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nomad cancels a plugin's stream only when forwarding output fails (the user's `~.` tells
    the plugin nothing): a silent console must still learn that nobody is attached."""
    monkeypatch.setattr(driver_service, "IDLE_PROBE", 0.05)
    ended = asyncio.Event()

    async def silent(on_output: OutputSink) -> ExecOutcome:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        raise AssertionError("unreachable")

    async def requests() -> AsyncIterator[pb.ExecTaskStreamingRequest]:
        setup = pb.ExecTaskStreamingRequest.Setup(
            task_id="t1", command=["nomad-vm:console"], tty=True
        )
        yield pb.ExecTaskStreamingRequest(setup=setup)
        await asyncio.Event().wait()

    async def main() -> pb.ExecTaskStreamingResponse:
        async with serving(FakeDriver(terminal_impl=silent)) as stub:
            call = stub.ExecTaskStreaming(requests())
            async with asyncio.timeout(10):
                probe = await anext(aiter(call))
                assert not ended.is_set()
                # What Nomad does when it cannot forward that frame to a departed user.
                call.cancel()
                await ended.wait()
            return probe

    probe = asyncio.run(main())
    assert probe.HasField("stdout") and probe.stdout.data == b"" and not probe.stdout.close
    assert not probe.exited


@pytest.mark.parametrize("tty", [False, True])
def test_a_bug_is_an_error_whose_text_fits_nomads_close_frame(tty: bool) -> None:
    bug = refuse(KeyError("a bug closed over EOF " + "x" * 300))
    driver = FakeDriver(exec_task_impl=bug, terminal_impl=bug)
    # The client writes nothing after the setup: grpc.aio reports a write that races the
    # server's status as its own INTERNAL error and drops the server's text (grpc issue 36066).
    end = run_session(driver, tty=tty, stdin=None)
    assert end.code == grpc.StatusCode.INTERNAL and end.exit_code is None
    # Nomad drops texts over the frame's limit, and any with "closed" or "EOF" in them.
    assert len(end.details.encode()) <= CLOSE_TEXT_LIMIT
    assert "closed" not in end.details and "EOF" not in end.details
    assert "log" in end.details


def test_command_not_runnable_is_invalid_argument_for_script_checks() -> None:
    assert classify(errors.CommandNotRunnable("x", 127)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        False,
    )


# guest_exec: what the guest agent says becomes which error, and stdin waits for the checks.


@dataclass
class FakeAgent:
    exec_error: Exception | None = None
    inputs: list[bytes | None] = field(default_factory=list)

    async def exec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        self.inputs.append(kwargs["stdin"])
        if self.exec_error is not None:
            raise self.exec_error
        return ExecResult(0, None, b"ok", b"", False)


def fake_task(agent: FakeAgent | None, *, running: bool = True, dir: Path = Path("/")) -> VMTask:
    """A task whose VM offers an agent channel at ``dir/agent.sock`` (nothing listens there
    unless a test says so)."""
    vm = SimpleNamespace(guest_agent=lambda: GuestAgent(dir / "agent.sock", rpc_timeout=1.0))
    entry = SimpleNamespace(
        running=running,
        agent=agent,
        config=SimpleNamespace(env={}),
        vm=vm,
        # A backend that cannot pause: the exec is never refused as "paused" here.
        capabilities=SimpleNamespace(pause=False),
    )
    return cast(VMTask, entry)


async def unread_stdin() -> bytes:
    raise AssertionError("stdin was read although the command could not run")


def test_stdin_is_read_only_when_the_command_can_run(tmp_path: Path) -> None:
    async def given(data: bytes) -> bytes:
        return data

    agent = FakeAgent()
    ran = asyncio.run(exec_in_guest(fake_task(agent), ["cat"], None, lambda: given(b"in")))
    assert (ran.stdout, agent.inputs) == (b"ok", [b"in"])
    with pytest.raises(errors.Unsupported, match="the VM has stopped"):
        asyncio.run(exec_in_guest(fake_task(agent, running=False), ["ls"], None, unread_stdin))
    # No agent client yet and no agent socket: the on-demand ping fails, stdin stays unread.
    with pytest.raises(errors.GuestAgentUnavailable, match="qemu-guest-agent"):
        asyncio.run(exec_in_guest(fake_task(None, dir=tmp_path), ["ls"], None, unread_stdin))


@pytest.mark.parametrize(
    ("errno_text", "exit_code", "wording"),
    [
        ("No such file or directory", 127, "command not found in the guest"),
        ("Permission denied", 126, "cannot be executed in the guest"),
    ],
)
def test_a_program_the_agent_cannot_start_is_a_shells_127_or_126(
    errno_text: str, exit_code: int, wording: str
) -> None:
    # qemu-ga's reply when g_spawn fails (qga/commands.c: QERR_QGA_COMMAND_FAILED).
    desc = (
        "Guest agent command failed, error was "
        f"'Failed to execute child process “nope” ({errno_text})'"
    )
    agent = FakeAgent(exec_error=AgentCommandError("guest-exec", "GenericError", desc))
    with pytest.raises(errors.CommandNotRunnable) as caught:
        asyncio.run(exec_in_guest(fake_task(agent), ["nope"], None))
    assert caught.value.exit_code == exit_code
    assert str(caught.value).startswith(f"nope: {wording}") and errno_text in str(caught.value)


def test_other_agent_errors_stay_agent_errors() -> None:
    status = AgentCommandError("guest-exec-status", "GenericError", "Invalid parameter 'pid'")
    with pytest.raises(errors.GuestAgentUnavailable, match="running 'ls' in the guest failed"):
        asyncio.run(exec_in_guest(fake_task(FakeAgent(exec_error=status)), ["ls"], None))

"""The guest agent client against a fake qemu-ga: an asyncio unix-socket server that speaks the
protocol the way the real one does (0xFF flushes its parser, guest-sync-delimited answers after a
0xFF, replies in order), and can misbehave: stale data, replies cut into pieces, silence, late
replies, garbage, dropped connections."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.guest_agent import (
    NO_AGENT,
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    ExecResult,
    GuestAgent,
)
from nomad_vm.vm.qemu.agent_channel import agent_argv

Status = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeAgent:
    """qemu-ga's side of the socket. Knobs are plain attributes, changed between calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.greeting = b""  # written on every new connection before anything else
        self.piece = 0  # > 0: replies go out in pieces of this many bytes
        self.silent = False  # read and record commands, never answer (no agent in the guest)
        self.delays: dict[str, float] = {}
        self.errors: dict[str, dict[str, str]] = {}
        self.garbage_for: set[str] = set()
        self.drop_on: set[str] = set()
        self.refuse_kill = False
        self.received: list[dict[str, Any]] = []
        self.flushes = 0
        self.connections = 0
        self.statuses: dict[int, list[Status]] = {}
        self.next_statuses: list[Status] = [{"exited": True, "exitcode": 0}]
        self.files: dict[str, bytearray] = {}
        self.handles: dict[int, tuple[str, int]] = {}  # handle -> (path, offset)
        self.io_limit = 1 << 30  # most bytes a single guest-file-read/write moves
        self._next_pid = 100
        self._server: asyncio.Server | None = None

    def commands(self, name: str) -> list[dict[str, Any]]:
        return [m.get("arguments", {}) for m in self.received if m["execute"] == name]

    async def __aenter__(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.greeting)
        buffer = b""
        try:
            while data := await reader.read(4096):
                buffer += data
                # Like qemu-ga's JSON parser: 0xFF drops what was partially read (with an error).
                *flushed, buffer = buffer.split(b"\xff")
                for segment in flushed:
                    self.flushes += 1
                    complete, _, partial = segment.rpartition(b"\n")
                    if not await self._lines(complete, writer):
                        return
                    if partial.strip():
                        await self._reply(writer, {"error": {"class": "GenericError"}})
                complete, _, buffer = buffer.rpartition(b"\n")
                if not await self._lines(complete, writer):
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _lines(self, data: bytes, writer: asyncio.StreamWriter) -> bool:
        """Handle the lines in data; False once the connection was dropped."""
        for line in filter(bytes.strip, data.split(b"\n")):
            message = json.loads(line)
            self.received.append(message)
            name = message["execute"]
            if name in self.drop_on:
                writer.close()
                return False
            if not self.silent:
                await asyncio.sleep(self.delays.get(name, 0))
                await self._answer(name, message.get("arguments", {}), writer)
        return True

    async def _answer(self, name: str, args: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if name == "guest-sync-delimited":
            writer.write(b"\xff")
            await self._reply(writer, {"return": args["id"]})
        elif name in self.garbage_for:
            writer.write(b"this is not json\n")
        elif name in self.errors:
            await self._reply(writer, {"error": self.errors[name]})
        elif name != "guest-shutdown":  # qemu-ga answers guest-shutdown only on failure
            await self._reply(writer, self._dispatch(name, args))

    def _dispatch(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "guest-ping":
            return {"return": {}}
        if name == "guest-info":
            return {"return": {"version": "7.2.0", "supported_commands": []}}
        if name == "guest-exec":
            return self._exec(args)
        if name == "guest-exec-status":
            queue = self.statuses[args["pid"]]
            status = queue.pop(0) if len(queue) > 1 else queue[0]
            if status.get("exited"):
                del self.statuses[args["pid"]]
            return {"return": status}
        return self._file(name, args)

    def _exec(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("arg", [None])[-2:-1] == ["kill"]:  # our client's kill-tree script
            if self.refuse_kill:
                return {"error": {"class": "GenericError", "desc": "no /bin/sh"}}
            self.statuses[int(args["arg"][-1])] = [{"exited": True, "signal": 9}]
            statuses = [{"exited": True, "exitcode": 0}]
        else:
            statuses = self.next_statuses
        self._next_pid += 1
        self.statuses[self._next_pid] = list(statuses)
        return {"return": {"pid": self._next_pid}}

    def _file(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "guest-file-open":
            if args["mode"] == "r" and args["path"] not in self.files:
                return {"error": {"class": "GenericError", "desc": "No such file or directory"}}
            if args["mode"] == "w":
                self.files[args["path"]] = bytearray()
            handle = 1000 + len(self.received)
            self.handles[handle] = (args["path"], 0)
            return {"return": handle}
        path, offset = self.handles[args["handle"]]
        content = self.files[path]
        if name == "guest-file-read":
            data = content[offset : offset + min(args["count"], self.io_limit)]
            self.handles[args["handle"]] = (path, offset + len(data))
            eof = offset + len(data) >= len(content)
            return {"return": {"count": len(data), "buf-b64": b64(data), "eof": eof}}
        if name == "guest-file-write":
            data = base64.b64decode(args["buf-b64"])[: self.io_limit]
            content[offset : offset + len(data)] = data
            self.handles[args["handle"]] = (path, offset + len(data))
            return {"return": {"count": len(data), "eof": False}}
        assert name == "guest-file-close", name
        del self.handles[args["handle"]]
        return {"return": {}}

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        data = json.dumps(reply).encode() + b"\n"
        step = self.piece or len(data)
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            if self.piece:
                await asyncio.sleep(0.001)


Scenario = Callable[[FakeAgent, GuestAgent], Awaitable[None]]


def run(tmp: Path, scenario: Scenario) -> None:
    async def main() -> None:
        async with FakeAgent(tmp / "qga.sock") as fake:
            agent = GuestAgent(fake.path, rpc_timeout=2.0)
            try:
                await scenario(fake, agent)
            finally:
                await agent.close()

    asyncio.run(main())


def test_argv_fragment_for_pc_and_microvm() -> None:
    assert agent_argv(Path("/run/a,b/qga.sock")) == [
        "-chardev", "socket,path=/run/a,,b/qga.sock,server=on,wait=off,id=qga0",
        "-device", "virtio-serial-pci,id=qga-serial",
        "-device", "virtserialport,bus=qga-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    assert agent_argv(Path("/q.sock"), microvm=True)[3] == "virtio-serial-device,id=qga-serial"


def test_sync_skips_stale_data_and_partial_lines(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        # Replies meant for an earlier client, an old delimited sync, and a cut-off line.
        fake.greeting = b'{"return": 4242}\n\xff{"return": 17}\n{"return": {"x": 1}}\n\xff{"ret'
        fake.piece = 3
        await agent.ping()
        assert (await agent.info())["version"] == "7.2.0"
        assert [m["execute"] for m in fake.received] == [
            "guest-sync-delimited", "guest-ping", "guest-info",
        ]  # fmt: skip
        assert fake.flushes == 1  # our own 0xFF went before the sync

    run(short_tmp, scenario)


def test_silent_agent_times_out_with_a_clear_error(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.silent = True
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(AgentUnavailable, match=r"within 0\.3s") as caught:
                await agent.ping(timeout=0.3)
            assert time.monotonic() - started < 1.0
            assert NO_AGENT in str(caught.value) and isinstance(caught.value, HypervisorError)
        fake.silent = False  # the agent starts: the same connection works, after a new sync
        await agent.ping()
        assert fake.connections == 1 and len(fake.commands("guest-sync-delimited")) == 3

    run(short_tmp, scenario)


def test_late_reply_after_a_timeout_is_discarded(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        await agent.ping()
        fake.delays["guest-info"] = 0.5
        with pytest.raises(AgentUnavailable, match="did not answer guest-info"):
            await agent.info(timeout=0.1)
        fake.delays.clear()
        fake.errors["guest-ping"] = {"class": "CommandDisabled", "desc": "disabled"}
        # The info reply arrives now; taking it for the ping's would be the bug.
        with pytest.raises(AgentCommandError, match="CommandDisabled") as caught:
            await agent.ping()
        assert caught.value.error_class == "CommandDisabled"
        assert len(fake.commands("guest-sync-delimited")) == 2

    run(short_tmp, scenario)


def test_garbage_and_dropped_connections_recover(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.garbage_for.add("guest-info")
        with pytest.raises(AgentProtocolError):
            await agent.info()
        fake.garbage_for.clear()
        fake.drop_on.add("guest-ping")
        with pytest.raises(AgentUnavailable, match="closed"):
            await agent.ping()
        fake.drop_on.clear()
        await agent.ping()
        assert fake.connections == 2

    run(short_tmp, scenario)


def test_no_socket_is_unavailable(short_tmp: Path) -> None:
    async def main() -> None:
        with pytest.raises(AgentUnavailable, match="cannot connect"):
            await GuestAgent(short_tmp / "missing.sock").ping()

    asyncio.run(main())


def test_exec_polls_until_exited(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.piece = 4000
        out = os.urandom(300_000)  # a reply line longer than one read, arriving in pieces
        fake.next_statuses = [{"exited": False}] * 3 + [
            {"exited": True, "exitcode": 3, "out-data": b64(out), "err-data": b64(b"err\n")}
        ]
        result = await agent.exec(["/bin/sh", "-c", "x"], stdin=b"in", env={"A": "1"}, timeout=10)
        assert (result.exit_code, result.signal, result.truncated) == (3, None, False)
        assert result.stdout == out and result.stderr == b"err\n"
        [call] = fake.commands("guest-exec")
        assert call == {
            "path": "/bin/sh", "arg": ["-c", "x"], "capture-output": True, "env": ["A=1"],
            "input-data": b64(b"in"),
        }  # fmt: skip
        assert len(fake.commands("guest-exec-status")) == 4

    run(short_tmp, scenario)


def test_exec_signal_and_truncation(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.next_statuses = [{"exited": True, "signal": 9}]
        result = await agent.exec(["sleep", "1"], timeout=None)
        assert (result.exit_code, result.signal, result.stdout) == (137, 9, b"")
        fake.next_statuses = [
            {"exited": True, "exitcode": 0, "out-data": b64(b"x"), "out-truncated": True}
        ]
        assert (await agent.exec(["yes"], timeout=None)).truncated
        fake.errors["guest-exec"] = {"class": "GenericError", "desc": "No such file"}
        with pytest.raises(AgentCommandError, match="No such file"):
            await agent.exec(["nope"], timeout=None)

    run(short_tmp, scenario)


def test_exec_timeout_kills_the_process_tree(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.next_statuses = [{"exited": False}]
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match=r"within 0\.3s; killed") as caught:
            await agent.exec(["sleep", "100"], timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 1.5
        assert caught.value.killed and caught.value.pid == 101
        kill = fake.commands("guest-exec")[1]
        assert kill["path"] == "/bin/sh" and kill["arg"][-2:] == ["kill", "101"]
        assert not fake.statuses  # both records collected in the agent

    run(short_tmp, scenario)


def test_exec_timeout_when_kill_fails(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.next_statuses = [{"exited": False}]
        fake.refuse_kill = True
        with pytest.raises(AgentTimeout, match="could not kill guest pid 101") as caught:
            await agent.exec(["sleep", "100"], timeout=0.1)
        assert not caught.value.killed

    run(short_tmp, scenario)


def test_cancelled_exec_kills_the_process(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.next_statuses = [{"exited": False}]
        fake.delays["guest-exec-status"] = 0.02  # so the cancel can land mid-reply
        task = asyncio.create_task(agent.exec(["sleep", "100"], timeout=None))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await agent.close()  # waits for the kill
        assert fake.commands("guest-exec")[1]["arg"][-2:] == ["kill", "101"]
        assert not fake.statuses

    run(short_tmp, scenario)


def test_file_round_trip_in_chunks(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.io_limit = 700  # the agent moves less than asked: the client must go on
        data = os.urandom(5000)
        await agent.file_write("/tmp/f", data)
        assert bytes(fake.files["/tmp/f"]) == data
        assert await agent.file_read("/tmp/f") == data
        with pytest.raises(AgentError, match="larger than 1000 bytes"):
            await agent.file_read("/tmp/f", max_bytes=1000)
        with pytest.raises(AgentCommandError, match="No such file"):
            await agent.file_read("/tmp/missing")
        assert not fake.handles  # every handle closed, also after errors

    run(short_tmp, scenario)


def test_shutdown_without_reply_then_resync(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        await agent.shutdown("reboot", confirm=0.1)
        assert fake.commands("guest-shutdown") == [{"mode": "reboot"}]
        await agent.ping()
        assert len(fake.commands("guest-sync-delimited")) == 2
        fake.errors["guest-shutdown"] = {"class": "GenericError", "desc": "denied"}
        with pytest.raises(AgentCommandError, match="denied"):
            await agent.shutdown(confirm=1.0)

    run(short_tmp, scenario)


def test_concurrent_calls_share_one_connection(short_tmp: Path) -> None:
    async def scenario(fake: FakeAgent, agent: GuestAgent) -> None:
        fake.piece = 5
        fake.next_statuses = [{"exited": False}, {"exited": True, "exitcode": 7}]
        info, result, pong, missing = await asyncio.gather(
            agent.info(),
            agent.exec(["a"], timeout=5),
            agent.ping(),
            agent.file_read("/none"),
            return_exceptions=True,
        )
        assert isinstance(info, dict) and info["version"] == "7.2.0"
        assert isinstance(result, ExecResult) and result.exit_code == 7
        assert pong is None and isinstance(missing, AgentCommandError)
        assert fake.connections == 1

    run(short_tmp, scenario)

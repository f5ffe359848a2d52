"""The serial console's plugin end (vm/serial_console.py) and sessions on it
(driver/console_session.py), against a real unix socket served the way QEMU serves the console:
one client at a time, bytes in are the guest's input, bytes out its output. The VMM end here is
test equipment; tests/integration/test_serial_console.py runs the real QEMU."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from nomad_vm.driver.console_session import (
    CONSOLE_COMMAND,
    is_console_command,
    run_console,
)
from nomad_vm.driver.guest_terminal import TerminalInput
from nomad_vm.driver.task import VMTask
from nomad_vm.errors import HypervisorError, Unsupported
from nomad_vm.vm.cloud_hypervisor.backend import CAPABILITIES as CH
from nomad_vm.vm.qemu.backend import CAPABILITIES as QEMU
from nomad_vm.vm.serial_console import CONSOLE_CLOSED, TOO_SLOW, SerialConsole


class FakeVMM:
    """The VMM's end of the console: accepts one client at a time, records what it gets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = bytearray()
        self.connections = 0
        self.closed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.closed.clear()
        self._writer = writer
        self._connected.set()
        while data := await reader.read(4096):
            self.received += data
        self._connected.clear()
        self.closed.set()
        writer.close()

    async def guest_writes(self, data: bytes) -> None:
        await asyncio.wait_for(self._connected.wait(), 5)
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.close()

    async def got(self, data: bytes) -> None:
        async def arrived() -> None:
            while data not in self.received:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(arrived(), 5)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def run(test: Callable[[FakeVMM], Awaitable[None]]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            vmm = FakeVMM(Path(tmp) / "serial.sock")
            await vmm.start()
            try:
                await asyncio.wait_for(test(vmm), 20)
            finally:
                await vmm.stop()

    asyncio.run(main())


def test_output_goes_to_every_attachment_and_input_from_each_to_the_guest() -> None:
    async def test(vmm: FakeVMM) -> None:
        console = SerialConsole(vmm.path)
        one = await console.attach()
        two = await console.attach()
        await vmm.guest_writes(b"login: ")
        assert await one.output() == b"login: "
        assert await two.output() == b"login: "
        await console.write(b"root\r")
        await vmm.got(b"root\r")
        assert vmm.connections == 1  # one connection, shared
        await console.detach(one)
        await vmm.guest_writes(b"Password: ")
        assert await two.output() == b"Password: "
        await console.detach(two)
        # The last one out closes the connection; the next attach makes a new one.
        await asyncio.wait_for(vmm.closed.wait(), 5)
        three = await console.attach()
        await vmm.guest_writes(b"again")
        assert await three.output() == b"again"
        assert vmm.connections == 2
        await console.close()
        assert await three.output() is None
        assert three.ended_because is not None

    run(test)


def test_the_vmm_closing_the_console_ends_every_attachment() -> None:
    async def test(vmm: FakeVMM) -> None:
        console = SerialConsole(vmm.path)
        one = await console.attach()
        await vmm.guest_writes(b"last words")
        await vmm.hang_up()
        assert await one.output() == b"last words"
        assert await one.output() is None
        assert one.ended_because == CONSOLE_CLOSED
        with pytest.raises(HypervisorError, match="serial console closed"):
            await console.write(b"x")
        await console.detach(one)

    run(test)


def test_a_session_that_falls_behind_is_ended_and_the_others_go_on() -> None:
    async def test(vmm: FakeVMM) -> None:
        console = SerialConsole(vmm.path, limit=1000)
        slow = await console.attach()
        fast = await console.attach()
        for _ in range(3):
            await vmm.guest_writes(b"x" * 400)
            got = b""
            while len(got) < 400:
                got += await fast.output() or b""
        # slow never read: 1200 bytes would exceed its 1000.
        assert await slow.output() == b"x" * 800
        assert await slow.output() is None
        assert slow.ended_because == TOO_SLOW
        await vmm.guest_writes(b"more")
        assert await fast.output() == b"more"
        await console.close()

    run(test)


def test_no_vmm_listening_is_a_clear_error() -> None:
    async def test(vmm: FakeVMM) -> None:
        console = SerialConsole(vmm.path.with_name("absent.sock"))
        with pytest.raises(HypervisorError, match="cannot connect to the VM's serial console"):
            await console.attach()
        assert console.attached == 0

    run(test)


# --- sessions -------------------------------------------------------------------------------


def entry_for(socket: Path | None, *, capabilities: Any = QEMU, running: bool = True) -> VMTask:
    vm = SimpleNamespace(console_socket=lambda: socket)
    fake = SimpleNamespace(
        running=running,
        vm=vm,
        capabilities=capabilities,
        config=SimpleNamespace(name="web"),
        console=None,
    )
    return cast(VMTask, fake)


async def typed(
    *messages: TerminalInput, hold: asyncio.Event | None = None
) -> AsyncIterator[TerminalInput]:
    for message in messages:
        yield message
    if hold is not None:
        await hold.wait()


class Screen:
    def __init__(self) -> None:
        self.data = b""

    async def show(self, data: bytes) -> None:
        self.data += data

    async def shows(self, needle: bytes) -> None:
        while needle not in self.data:
            await asyncio.sleep(0.01)


def test_ctrl_rbracket_detaches_after_sending_what_preceded_it() -> None:
    async def test(vmm: FakeVMM) -> None:
        entry = entry_for(vmm.path)
        screen = Screen()
        hold = asyncio.Event()
        inputs = typed(
            TerminalInput(rows=40, cols=120),  # no size on a serial line: ignored
            TerminalInput(data=b"ls\r"),
            TerminalInput(data=b"pwd\x1dnot sent"),
            hold=hold,
        )
        outcome = await run_console(entry, [CONSOLE_COMMAND], inputs, screen.show)
        assert outcome.exit_code == 0
        assert bytes(vmm.received) == b"ls\rpwd"
        assert b"attached to the serial console of task web" in screen.data
        assert screen.data.endswith(b"detached from the serial console; the VM keeps running.\r\n")
        await asyncio.wait_for(vmm.closed.wait(), 5)  # nobody attached: connection dropped

    run(test)


def test_the_end_of_input_detaches_and_output_flows_meanwhile() -> None:
    async def test(vmm: FakeVMM) -> None:
        entry = entry_for(vmm.path)
        screen = Screen()
        release = asyncio.Event()

        async def inputs() -> AsyncIterator[TerminalInput]:
            yield TerminalInput(data=b"\r")
            await release.wait()
            yield TerminalInput(end=True)

        session = asyncio.create_task(run_console(entry, [CONSOLE_COMMAND], inputs(), screen.show))
        await vmm.got(b"\r")
        await vmm.guest_writes(b"debian login: ")
        await asyncio.wait_for(screen.shows(b"debian login: "), 5)
        release.set()
        assert (await session).exit_code == 0

    run(test)


def test_the_console_going_away_ends_the_session_with_the_reason() -> None:
    async def test(vmm: FakeVMM) -> None:
        entry = entry_for(vmm.path)
        screen = Screen()
        hold = asyncio.Event()
        session = asyncio.create_task(
            run_console(entry, [CONSOLE_COMMAND], typed(hold=hold), screen.show)
        )
        await vmm.guest_writes(b"Power down")
        await vmm.hang_up()
        outcome = await session
        assert outcome.exit_code == 1
        assert b"Power down" in screen.data
        assert CONSOLE_CLOSED.encode() in screen.data

    run(test)


@pytest.mark.parametrize(
    ("entry", "command", "message"),
    [
        (entry_for(Path("/x")), [CONSOLE_COMMAND, "ttyS1"], "takes no arguments"),
        (entry_for(Path("/x"), capabilities=CH), [CONSOLE_COMMAND], "no read-write serial"),
        (entry_for(None), [CONSOLE_COMMAND], "started by an earlier nomad-vm"),
        (entry_for(Path("/x"), running=False), [CONSOLE_COMMAND], "the VM has stopped"),
    ],
)
def test_refusals_name_the_reason(entry: VMTask, command: list[str], message: str) -> None:
    async def test() -> None:
        with pytest.raises(Unsupported, match=message):
            await run_console(entry, command, typed(), Screen().show)

    asyncio.run(test())


def test_the_reserved_name_is_the_first_word_exactly() -> None:
    assert CH.serial_console is False and QEMU.serial_console is True
    assert is_console_command([CONSOLE_COMMAND])
    assert not is_console_command([])
    assert not is_console_command(["/bin/sh", CONSOLE_COMMAND])
    assert not is_console_command(["./" + CONSOLE_COMMAND])
    assert not is_console_command(["console"])


def test_a_one_shot_exec_or_script_check_of_the_reserved_name_is_refused() -> None:
    from nomad_vm.driver.driver import VMDriver

    async def test() -> None:
        driver = VMDriver()
        driver._tasks["t1"] = entry_for(Path("/x"))
        with pytest.raises(Unsupported, match="not a command to run"):
            await driver.exec_task("t1", [CONSOLE_COMMAND], 5.0)

    asyncio.run(test())

"""Interactive `nomad alloc exec -t` sessions: a pty in the guest, relayed over its own port.

The guest agent cannot give a command a terminal, so a session works like this:

1. a port is hot-plugged into the VM (``RunningVM.open_terminal``; with QEMU a virtio-serial
   port), its host side a socket; only backends whose capabilities offer ``terminal_hotplug``;
2. the guest agent starts ``python3 -c <guest_pty_relay source>`` in the guest, which opens that
   port, runs the command on a new pty and relays frames between the two;
3. Nomad's stdin and window-size messages become frames to the guest; terminal output frames
   become Nomad's stdout; the relay's exit frame is the command's exit status;
4. the port is unplugged and its socket removed, however the session ended.

It needs python3 in the guest (every cloud-init image has it) and no network, keys or sshd.
The command runs as root, like every agent exec. A missing python3 is a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nomad_vm.driver.guest_exec import GUEST_PATH, ExecOutcome, agent_for
from nomad_vm.driver.task import VMTask
from nomad_vm.errors import GuestAgentUnavailable, Unsupported
from nomad_vm.vm import guest_pty_relay as relay
from nomad_vm.vm.guest_agent import AgentError, ExecResult

RELAY_SOURCE = inspect.getsource(relay)
DEFAULT_WINDOW = (24, 80)
# After the relay process has exited, its last frames may still be in flight on the port.
_DRAIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class TerminalInput:
    """One message from Nomad: typed bytes, a new window size, or the end of input."""

    data: bytes = b""
    rows: int = 0
    cols: int = 0
    end: bool = False


OutputSink = Callable[[bytes], Awaitable[None]]


async def run_terminal(
    entry: VMTask,
    command: Sequence[str],
    inputs: AsyncIterator[TerminalInput],
    on_output: OutputSink,
) -> ExecOutcome:
    if not entry.running or entry.vm is None:
        raise Unsupported("the VM has stopped; there is nothing to run the command in")
    if not entry.capabilities.terminal_hotplug:
        raise Unsupported(
            "this VM's hypervisor cannot add a terminal port; run the command with -t=false"
        )
    if not command:
        raise Unsupported("no command given")
    agent = await agent_for(entry)
    vm = entry.vm
    port = await vm.open_terminal()
    tasks: list[asyncio.Task[Any]] = []
    writer = None
    try:
        reader, writer = await asyncio.open_unix_connection(str(port.socket))
        rows, cols = DEFAULT_WINDOW
        argv = ["python3", "-c", RELAY_SOURCE, port.name, str(rows), str(cols), *command]
        env = {"PATH": GUEST_PATH, "TERM": "xterm-256color", **entry.config.env}
        process = asyncio.create_task(agent.exec(argv, env=env, timeout=None))
        tasks.append(process)
        tasks.append(asyncio.create_task(_send_inputs(inputs, writer)))
        status = await _receive_output(reader, process, on_output)
        # The relay exits right after its exit frame: let the agent collect it normally rather
        # than cancelling, which would start a kill of the (finished) process tree in the guest.
        await asyncio.wait({process}, timeout=_DRAIN_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await vm.close_terminal(port)
    if status < 0:
        return ExecOutcome(b"", b"", 128 - status, signal=-status)
    return ExecOutcome(b"", b"", status)


async def _send_inputs(inputs: AsyncIterator[TerminalInput], writer: asyncio.StreamWriter) -> None:
    async for message in inputs:
        if message.rows > 0 and message.cols > 0:
            writer.write(
                relay.encode_frame(relay.RESIZE, relay.WINDOW.pack(message.rows, message.cols))
            )
        if message.data:
            writer.write(relay.encode_frame(relay.INPUT, message.data))
        if message.end:
            writer.write(relay.encode_frame(relay.END_OF_INPUT))
        await writer.drain()


async def _receive_output(
    reader: asyncio.StreamReader, process: asyncio.Task[ExecResult], on_output: OutputSink
) -> int:
    """Relay output frames until the exit frame; its status. Fails when the relay process ends
    without one (no python3 in the guest, the port never appeared, ...)."""
    pending = b""
    while True:
        read: asyncio.Future[Any] = asyncio.ensure_future(reader.read(65536))
        if process.done():
            done, _ = await asyncio.wait({read}, timeout=_DRAIN_TIMEOUT)
        else:
            waiting: set[asyncio.Future[Any]] = {read, process}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if read not in done:
            read.cancel()
            if process.done():
                raise _relay_failed(process)
            continue
        chunk = read.result()
        if not chunk:
            await asyncio.wait({process}, timeout=_DRAIN_TIMEOUT)
            raise _relay_failed(process)
        frames, pending = relay.decode_frames(pending + chunk)
        for kind, payload in frames:
            if kind == relay.EXITED:
                return int(relay.STATUS.unpack(payload)[0])
            if kind == relay.OUTPUT:
                await on_output(payload)


def _relay_failed(process: asyncio.Task[ExecResult]) -> Exception:
    if not process.done():
        return GuestAgentUnavailable("the terminal session in the guest ended without a status")
    try:
        result = process.result()
    except AgentError as exc:
        return GuestAgentUnavailable(
            f"could not start the terminal relay in the guest ({exc}); interactive exec needs "
            "python3 in the guest, or run the command with -t=false"
        )
    detail = (result.stderr or result.stdout).decode(errors="replace").strip()
    return GuestAgentUnavailable(
        f"the terminal relay in the guest failed (exit {result.exit_code}): "
        f"{detail or 'no output'}; interactive exec needs python3 in the guest, "
        "or run the command with -t=false"
    )

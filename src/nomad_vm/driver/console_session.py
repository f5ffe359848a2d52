"""`nomad alloc exec -t -task TASK ALLOC nomad-vm:console`: the VM's serial console, read-write.

The reserved command ``nomad-vm:console`` attaches the exec session to the guest's first serial
port (its getty, or whatever the guest runs there) instead of running a program in the guest.
It goes through `nomad alloc exec`, so Nomad's ACLs (``alloc-exec``), its audit log and the web
UI's terminal apply as to any exec. The name has a colon and our prefix so that it cannot be a
guest program by accident; a guest program really named so still runs by its path.

It needs no guest agent (it is the rescue path: a guest whose network or agent is broken still
has a getty on ttyS0) and no python3 in the guest. The console's output keeps going to the
task's stdout (`nomad alloc logs`) at the same time: the VMM writes that copy itself.

Several sessions may attach at once: each sees all output from the moment it attached, and what
any of them types reaches the guest (shared input, ``vm.serial_console``). A session ends, and
only the session, when the user types Ctrl-] (``DETACH_BYTE``), when the Nomad CLI's own escape
``~.`` or the web UI closes the stream, or when the client goes away; the VM is not touched.
It also ends, with the reason on the terminal, when the VM stops or the session falls too far
behind the console's output. A serial line has no window size: size messages are ignored (run
``stty rows R cols C`` in the guest to tell it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from nomad_vm.driver.guest_exec import ExecOutcome
from nomad_vm.driver.guest_terminal import OutputSink, TerminalInput
from nomad_vm.driver.task import VMTask
from nomad_vm.errors import Unsupported
from nomad_vm.vm.serial_console import Attachment, SerialConsole

CONSOLE_COMMAND = "nomad-vm:console"
# Ctrl-], as telnet and virsh console: a byte a login session rarely needs.
DETACH_BYTE = 0x1D
ATTACHED = (
    "[nomad-vm] attached to the serial console of task {task}; "
    "Ctrl-] detaches (the VM keeps running). Press Enter for a prompt.\r\n"
)
DETACHED = "\r\n[nomad-vm] detached from the serial console; the VM keeps running.\r\n"
ENDED = "\r\n[nomad-vm] {reason}; session ended.\r\n"
EXIT_DETACHED = 0
EXIT_CONSOLE_ENDED = 1


def is_console_command(command: Sequence[str]) -> bool:
    return bool(command) and command[0] == CONSOLE_COMMAND


def console_of(entry: VMTask) -> SerialConsole:
    """The task's console connection, made on first use (``Unsupported`` when there is none)."""
    if not entry.running or entry.vm is None:
        raise Unsupported("the VM has stopped; there is no serial console to attach to")
    if not entry.capabilities.serial_console:
        raise Unsupported(
            "this VM's hypervisor offers no read-write serial console "
            "(its output is in `nomad alloc logs`)"
        )
    socket = entry.vm.console_socket()
    if socket is None:
        raise Unsupported(
            "this VM has no console socket (it was started by an earlier nomad-vm); "
            "restart the task to get one"
        )
    if entry.console is None or entry.console.socket != socket:
        entry.console = SerialConsole(socket)
    return entry.console


async def run_console(
    entry: VMTask,
    command: Sequence[str],
    inputs: AsyncIterator[TerminalInput],
    on_output: OutputSink,
) -> ExecOutcome:
    """One session on the console until it detaches or the console goes away."""
    if len(command) > 1:
        raise Unsupported(f"{CONSOLE_COMMAND} takes no arguments (got {' '.join(command[1:])})")
    console = console_of(entry)
    attachment = await console.attach()
    # Output arriving meanwhile waits in the attachment, after the greeting.
    try:
        await on_output(ATTACHED.format(task=entry.config.name).encode())
    except BaseException:
        await console.detach(attachment)
        raise
    sending = asyncio.create_task(_send_inputs(inputs, console), name="console input")
    receiving = asyncio.create_task(_forward(attachment, on_output), name="console output")
    try:
        done, _ = await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done and sending.exception() is None:
            # The user detached (or the client went away): output not yet forwarded to this
            # session is dropped (it is in the logs); the goodbye is the last thing shown.
            await on_output(DETACHED.encode())
            return ExecOutcome(b"", b"", EXIT_DETACHED)
        if sending in done:
            attachment.end(str(sending.exception()))
        await receiving
        await on_output(ENDED.format(reason=attachment.ended_because or "ended").encode())
        return ExecOutcome(b"", b"", EXIT_CONSOLE_ENDED)
    finally:
        for task in (sending, receiving):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await console.detach(attachment)


async def _send_inputs(inputs: AsyncIterator[TerminalInput], console: SerialConsole) -> None:
    """Typed bytes to the guest until Ctrl-] or the end of input (HypervisorError when the
    console is gone)."""
    async for message in inputs:
        data = message.data
        cut = data.find(DETACH_BYTE)
        if cut >= 0:
            data = data[:cut]
        if data:
            await console.write(data)
        if cut >= 0 or message.end:
            return


async def _forward(attachment: Attachment, on_output: OutputSink) -> None:
    while (data := await attachment.output()) is not None:
        await on_output(data)

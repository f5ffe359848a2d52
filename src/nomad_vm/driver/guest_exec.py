"""`nomad alloc exec`, script checks and `nomad alloc signal` for VMs, through the guest agent.

Exec runs the command in the guest with qemu-guest-agent's guest-exec: stdin is passed in, and
stdout, stderr and the exit code come back when the command has exited (the agent buffers the
output, so nothing streams while it runs). There is no pty on that path: interactive sessions
(`nomad alloc exec -t`) are refused with an error that says so.

Signals: SIGTERM and SIGINT mean "shut the machine down" and press the ACPI power button; other
signals have no meaning for a whole VM and are refused with an error naming the signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nomad_vm.driver.startup import AGENT_SOCKET
from nomad_vm.driver.task import VMTask
from nomad_vm.errors import GuestAgentUnavailable, Unsupported
from nomad_vm.vm.qemu.agent import AgentError, AgentTimeout, GuestAgent

# qemu-ga replaces the whole environment of the command: give it a usable PATH.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POWER_SIGNALS = ("SIGTERM", "SIGINT")


@dataclass(frozen=True)
class ExecOutcome:
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int = 0
    # Set when the command could not run to the end (timeout); Nomad shows it as the error.
    err: str = ""


async def agent_for(entry: VMTask) -> GuestAgent:
    """The task's agent client; connects on demand when the background watcher has not yet."""
    if entry.agent is not None:
        return entry.agent
    agent = GuestAgent(entry.runtime_dir / AGENT_SOCKET)
    try:
        await agent.ping(timeout=3.0)
    except AgentError as exc:
        await agent.close()
        raise GuestAgentUnavailable(
            f"the guest agent does not answer, so commands cannot run in this VM ({exc}); "
            "the image needs qemu-guest-agent installed and running"
        ) from None
    entry.agent = agent
    return agent


async def exec_in_guest(
    entry: VMTask, command: Sequence[str], timeout: float | None, stdin: bytes | None = None
) -> ExecOutcome:
    if not entry.running:
        raise Unsupported("the VM has stopped; there is nothing to run the command in")
    if not command:
        raise Unsupported("no command given")
    agent = await agent_for(entry)
    env = {"PATH": GUEST_PATH, **entry.config.env}
    try:
        result = await agent.exec(list(command), stdin=stdin, env=env, timeout=timeout or None)
    except AgentTimeout as exc:
        return ExecOutcome(b"", b"", 124, err=str(exc))
    except AgentError as exc:
        raise GuestAgentUnavailable(f"running {command[0]!r} in the guest failed: {exc}") from None
    return ExecOutcome(result.stdout, result.stderr, result.exit_code, result.signal or 0)


async def signal_guest(entry: VMTask, signal_name: str) -> None:
    name = signal_name.upper() if signal_name.upper().startswith("SIG") else f"SIG{signal_name}"
    if name not in POWER_SIGNALS:
        raise Unsupported(
            f"{name} has no meaning for a whole VM: SIGTERM or SIGINT request an ACPI "
            "shutdown; to signal a process inside the guest use `nomad alloc exec` with kill"
        )
    if entry.vm is None or not entry.running or not await entry.vm.powerdown():
        raise GuestAgentUnavailable("the VM is not running or its QMP socket does not answer")
    entry.emit(f"{name} received: ACPI shutdown requested")

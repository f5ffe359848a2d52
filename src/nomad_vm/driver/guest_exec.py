"""`nomad alloc exec`, script checks and `nomad alloc signal` for VMs, through the guest agent.

Exec runs the command in the guest with qemu-guest-agent's guest-exec: stdin is passed in, and
stdout, stderr and the exit code come back when the command has exited (the agent buffers the
output, so nothing streams while it runs). There is no pty on that path: interactive sessions
(`nomad alloc exec -t`) take another one, in guest_terminal.

Signals: SIGTERM and SIGINT mean "shut the machine down" and press the ACPI power button;
SIGSTOP and SIGCONT pause and resume the whole VM (``driver.pause``, before this module); other
signals go, through the agent, to the systemd unit (`signal_unit`) or the pidfile's process
(`signal_pidfile`) the task names, and are refused with an error saying so when it names none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nomad_vm.driver.task import VMTask
from nomad_vm.errors import (
    CommandNotRunnable,
    GuestAgentUnavailable,
    HypervisorError,
    Unsupported,
)
from nomad_vm.vm.guest_agent import AgentCommandError, AgentError, AgentTimeout, GuestAgent

# qemu-ga replaces the whole environment of the command: give it a usable PATH.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POWER_SIGNALS = ("SIGTERM", "SIGINT")
# Where a shell says "not found" (127) rather than "cannot execute" (126): glib's g_spawn error,
# which qemu-ga quotes, ends with the errno text.
_NOT_FOUND = "No such file or directory"

# The command's stdin, read only once the guest can run the command: a refusal (no agent, VM
# stopped) is then reported at once instead of after the user's end of input.
StdinReader = Callable[[], Awaitable[bytes]]


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
    # exec, terminal sessions and signals to a unit all need the guest to run.
    await refuse_if_paused(entry, "commands cannot run in it")
    if entry.agent is not None:
        return entry.agent
    agent = entry.vm.guest_agent() if entry.vm is not None else None
    if agent is None:
        raise GuestAgentUnavailable(
            "this VM has no guest agent channel, so commands cannot run in it"
        )
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
    entry: VMTask,
    command: Sequence[str],
    timeout: float | None,
    stdin: StdinReader | None = None,
) -> ExecOutcome:
    if not entry.running:
        raise Unsupported("the VM has stopped; there is nothing to run the command in")
    if not command:
        raise Unsupported("no command given")
    agent = await agent_for(entry)
    env = {"PATH": GUEST_PATH, **entry.config.env}
    data = await stdin() if stdin is not None else b""
    try:
        result = await agent.exec(
            list(command), stdin=data or None, env=env, timeout=timeout or None
        )
    except AgentTimeout as exc:
        return ExecOutcome(b"", b"", 124, err=str(exc))
    except AgentError as exc:
        if isinstance(exc, AgentCommandError) and exc.command == "guest-exec":
            # The agent answered but could not start the program: the user's command is at fault.
            raise not_runnable(command[0], exc.desc, env["PATH"]) from None
        raise GuestAgentUnavailable(f"running {command[0]!r} in the guest failed: {exc}") from None
    return ExecOutcome(result.stdout, result.stderr, result.exit_code, result.signal or 0)


async def refuse_if_paused(entry: VMTask, consequence: str) -> None:
    """A paused guest runs nothing: say so at once rather than after the agent's timeout."""
    if entry.vm is None or not entry.capabilities.pause:
        return
    try:
        paused = await entry.vm.is_paused()
    except HypervisorError:
        return  # the exec itself reports a VMM that does not answer
    if paused:
        raise Unsupported(f"the VM is paused, so {consequence} (SIGCONT resumes it)")


def not_runnable(program: str, agent_says: str, path: str) -> CommandNotRunnable:
    """The guest agent could not start ``program``: say so as a shell would, with its reason."""
    if _NOT_FOUND in agent_says:
        return CommandNotRunnable(
            f"{program}: command not found in the guest (PATH={path}; qemu-ga: {agent_says})", 127
        )
    return CommandNotRunnable(
        f"{program}: cannot be executed in the guest (qemu-ga: {agent_says})", 126
    )


async def signal_guest(entry: VMTask, signal_name: str, target: SignalTarget) -> None:
    name = signal_name.upper() if signal_name.upper().startswith("SIG") else f"SIG{signal_name}"
    if name in POWER_SIGNALS:
        if entry.vm is None or not entry.running or not await entry.vm.power_down():
            raise GuestAgentUnavailable("the VM is not running or its VMM does not answer")
        entry.emit(f"{name} received: ACPI shutdown requested")
        return
    if not target.unit and not target.pidfile:
        raise Unsupported(
            f"{name} has no receiver: SIGTERM and SIGINT shut the VM down; for other signals "
            "set signal_unit (a systemd unit) or signal_pidfile (a pidfile in the guest)"
        )
    if target.unit:
        argv = ["systemctl", "kill", f"--signal={name}", "--", target.unit]
    else:
        # The pidfile is read inside the guest; "$1" keeps its path out of the shell syntax.
        script = 'pid=$(cat "$1") && kill -s "$2" "$pid"'
        argv = ["/bin/sh", "-c", script, "signal", str(target.pidfile), name[3:]]
    outcome = await exec_in_guest(entry, argv, timeout=30)
    if outcome.exit_code != 0 or outcome.err:
        detail = (outcome.stderr or outcome.stdout).decode(errors="replace").strip()
        raise GuestAgentUnavailable(
            f"delivering {name} in the guest failed: {outcome.err or detail or outcome.exit_code}"
        )
    entry.emit(f"{name} delivered to {target.unit or target.pidfile} in the guest")


@dataclass(frozen=True)
class SignalTarget:
    """Where signals other than SIGTERM/SIGINT go inside the guest (task options)."""

    unit: str | None = None
    pidfile: str | None = None

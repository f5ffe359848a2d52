"""What the person who ran `nomad alloc exec` or `nomad alloc signal` sees when the VM cannot do
it, through the real Nomad CLI and agent. The tiny guest has no guest agent, so every exec into
it is refused by the driver.

Nomad passes an exec error's text to the CLI only in a websocket close frame (123 bytes at most;
longer text is lost and the CLI says "unexpected EOF"), so the driver's reason must arrive as the
session's output, with a shell's exit code (126). A script check (the unary ExecTask) shows a
gRPC error's text whole, as the check's output.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO
from tests.e2e.conftest import run_tiny_job, running_agent, running_consul, wait_alloc
from tests.e2e.terminal import run_on_terminal

pytestmark = pytest.mark.e2e
JOB = REPO / "examples" / "demo.nomad.hcl"
# The driver's explanation, in two parts that a terminal would not split.
REASON = b"the guest agent does not answer"
ADVICE = b"qemu-guest-agent installed"
CANNOT_EXECUTE = 126


@pytest.fixture(scope="module")
def tiny_alloc(agent: DevAgent, tiny_guest) -> Iterator[str]:  # type: ignore[no-untyped-def]
    run_tiny_job(agent, JOB, tiny_guest)
    yield str(wait_alloc(agent, "vm-demo", {"running"})["ID"])
    agent.nomad("job", "stop", "-detach", "vm-demo")
    wait_alloc(agent, "vm-demo", {"complete"}, timeout=90)


def exec_argv(agent: DevAgent, alloc: str, tty: bool, *command: str) -> list[str]:
    flag = "-t" if tty else "-t=false"
    return agent.command("alloc", "exec", flag, "-task", "tiny", alloc, *command)


def test_exec_without_agent_shows_the_reason_and_exits_126(
    agent: DevAgent, tiny_alloc: str
) -> None:
    # stdin stays open (communicate() would close it), as when a user runs the command at a
    # prompt: the refusal must not wait for the end of input. The output is small: the pipes
    # do not fill while nobody reads them.
    cli = subprocess.Popen(
        exec_argv(agent, tiny_alloc, False, "ls", "/"),
        env=agent.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        cli.wait(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
        stdout, stderr = cli.communicate()
    print(f"-t=false: exit {cli.returncode}, stderr {stderr!r}")
    assert b"unexpected EOF" not in stderr
    assert REASON in stderr and ADVICE in stderr, stderr
    assert (stdout, cli.returncode) == (b"", CANNOT_EXECUTE)


def test_terminal_exec_without_agent_shows_the_reason_and_exits_126(
    agent: DevAgent, tiny_alloc: str
) -> None:
    session = run_on_terminal(
        exec_argv(agent, tiny_alloc, True, "/bin/sh"), agent.env, rows=24, cols=80
    )
    print(f"-t: exit {session.returncode}, output {session.output!r}")
    assert b"unexpected EOF" not in session.output
    assert REASON in session.output and ADVICE in session.output, session
    # The CLI's terminal is raw during the session: the driver's line ends in \r\n.
    assert b"installed and running\r\n" in session.output, session
    assert session.returncode == CANNOT_EXECUTE, session


def test_signal_without_receiver_names_the_options(agent: DevAgent, tiny_alloc: str) -> None:
    done = subprocess.run(
        agent.command("alloc", "signal", "-s", "SIGHUP", tiny_alloc, "tiny"),
        env=agent.env,
        capture_output=True,
        timeout=60,
    )
    print(f"signal: exit {done.returncode}, stdout {done.stdout!r}, stderr {done.stderr!r}")
    assert done.returncode != 0
    assert b"SIGHUP has no receiver" in done.stderr, done
    assert b"signal_unit" in done.stderr and b"signal_pidfile" in done.stderr, done


SCRIPT_CHECK_JOB = """
variable "kernel" { type = string }
variable "initramfs" { type = string }

job "tiny-check" {
  group "vm" {
    task "tiny" {
      driver = "vm"
      config {
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = "console=ttyS0 quiet no_timer_check"
      }
      service {
        provider = "consul"
        name     = "tiny-check"
        check {
          name     = "in-guest"
          type     = "script"
          command  = "/bin/true"
          interval = "5s"
          timeout  = "10s"
        }
      }
      resources {
        memory = 256
      }
      kill_timeout = "10s"
    }
  }
}
"""


def test_script_check_without_agent_shows_the_reason(tiny_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with (
        running_consul() as consul,
        running_agent([tiny_guest.vmlinux.parent], consul_address=consul.address) as agent,
    ):
        job = tmp_path / "tiny-check.nomad.hcl"
        job.write_text(SCRIPT_CHECK_JOB)
        run_tiny_job(agent, job, tiny_guest)
        wait_alloc(agent, "tiny-check", {"running"})
        # The check is registered critical with no output; Nomad updates it once it has run.
        deadline = time.monotonic() + 120
        output = ""
        while REASON.decode() not in output:
            assert time.monotonic() < deadline, f"the check output never named the reason: {output}"
            checks = consul.api("/v1/health/checks/tiny-check")
            assert isinstance(checks, list)
            output = " ".join(str(c["Output"]) for c in checks)
            time.sleep(1)
        print(f"script check output: {output!r}")
        assert all(c["Status"] == "critical" for c in checks), checks
        assert ADVICE.decode() in output, output
        agent.nomad("job", "stop", "-detach", "tiny-check")
        wait_alloc(agent, "tiny-check", {"complete"}, timeout=90)

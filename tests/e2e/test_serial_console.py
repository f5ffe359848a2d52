"""The serial console, read-write, through the real Nomad agent and CLI:
`nomad alloc exec -t -task vm <alloc> nomad-vm:console` on a terminal of its own.

Debian: log in on the guest's serial getty as the cloud-init user with the job's
`default_user_password`, run a command and see its output, detach with Ctrl-]; the VM keeps
running and `nomad alloc logs` has the console, before and after the detach. The tiny guest
runs no guest agent: its console (a shell on ttyS0) is reached all the same, and the CLI's own
escape (`~.`) detaches.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.driver.console_session import CONSOLE_COMMAND
from nomad_vm.guests.tiny import tiny_cmdline
from tests.conftest import wait_until
from tests.e2e.conftest import DEBIAN_VARIABLES, run_debian_job, running_agent, wait_alloc
from tests.e2e.terminal import InteractiveTerminal

pytestmark = pytest.mark.e2e

DEBIAN_JOB = """
job "console-debian" {
  group "vm" {
    task "vm" {
      driver = "vm"
      config {
        image                 = var.image
        kernel                = var.kernel
        initramfs             = var.initramfs
        cmdline               = var.cmdline
        hostname              = "console-1"
        default_user_password = "%(password)s"
        cmds                  = ["echo cloud-init-done > /dev/ttyS0"]
      }
      resources {
        cpu    = 1000
        memory = 1024
      }
      kill_timeout = "30s"
    }
  }
}
"""

TINY_SHELL = "echo console-shell-ready; exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1"
TINY_JOB = """
job "console-tiny" {
  group "vm" {
    task "vm" {
      driver = "vm"
      config {
        kernel    = "%(kernel)s"
        initramfs = "%(initramfs)s"
        cmdline   = "%(cmdline)s"
      }
      resources {
        memory = 160
      }
      kill_timeout = "10s"
    }
  }
}
"""


@pytest.fixture(scope="module")
def console_agent(debian_guest, tiny_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([debian_guest.disk.parent, tiny_guest.vmlinux.parent]) as agent:
        yield agent


def alloc_logs(agent: DevAgent, alloc: str) -> str:
    return agent.nomad("alloc", "logs", alloc, "vm", check=False)


def wait_in_logs(agent: DevAgent, alloc: str, text: str, timeout: float) -> None:
    found = wait_until(lambda: text in alloc_logs(agent, alloc), timeout, every=2)
    assert found, f"{text!r} not in the logs: {alloc_logs(agent, alloc)[-3000:]}"


def console_clients(agent: DevAgent) -> int:
    """Connections QEMU has accepted on the task's console socket (the plugin holds one while
    sessions are attached), from the kernel's table of unix sockets."""
    (socket,) = agent.config.workdir.rglob("serial.sock")
    table = subprocess.run(
        ["ss", "-xH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in table.splitlines() if str(socket) in line.split())


def console(agent: DevAgent, alloc: str) -> InteractiveTerminal:
    nomad = str(agent.config.nomad_binary)
    argv = [nomad, "alloc", "exec", "-t", "-task", "vm", alloc, CONSOLE_COMMAND]
    return InteractiveTerminal(argv, agent.env)


def test_login_on_the_debian_serial_getty(
    console_agent: DevAgent,
    debian_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    agent = console_agent
    password = secrets.token_hex(8)
    # The password is in the job file (private to this test), never on a command line.
    job = tmp_path / "console-debian.nomad.hcl"
    job.touch(mode=0o600)
    job.write_text(DEBIAN_VARIABLES + DEBIAN_JOB % {"password": password})
    run_debian_job(agent, job, debian_guest)
    alloc = str(wait_alloc(agent, "console-debian", {"running"})["ID"])
    # cloud-init has set the password once the job's cmds (its last stage) have run.
    wait_in_logs(agent, alloc, "cloud-init-done", 300)

    term = console(agent, alloc)
    try:
        term.expect(b"attached to the serial console", 60)
        term.send(b"\r")
        at = term.expect(b"login:", 60)
        term.send(b"nomad\r")
        at = term.expect(b"assword:", 60, at)
        term.send(password.encode() + b"\r")
        # login discards type-ahead: wait for the shell's prompt.
        at = term.expect(b"nomad@console-1:~$", 120, at)
        term.send(b"echo logged-in-as-$(id -un)-$((6*7))\r")
        term.expect(b"logged-in-as-nomad-42", 120, at)
        term.send(b"\x1d")  # Ctrl-]
        assert term.wait(30) == 0, term.output[-2000:]
        assert b"detached from the serial console" in term.output
    finally:
        term.close()

    # The VM is untouched, and its console is still in `nomad alloc logs`: what the session
    # showed, and output written after the detach (through the guest agent, to ttyS0).
    status = wait_alloc(agent, "console-debian", {"running"}, timeout=5)
    assert status["TaskStates"]["vm"]["Restarts"] == 0  # type: ignore[index]
    logs = alloc_logs(agent, alloc)
    assert "logged-in-as-nomad-42" in logs
    assert password not in logs  # a getty does not echo the password
    nomad = str(agent.config.nomad_binary)
    write = "echo after-detach-$((2+3)) > /dev/ttyS0"
    after = subprocess.run(
        [nomad, "alloc", "exec", "-t=false", "-task", "vm", alloc, "/bin/sh", "-c", write],
        env=agent.env,
        capture_output=True,
        timeout=120,
    )
    assert after.returncode == 0, after
    wait_in_logs(agent, alloc, "after-detach-5", 60)

    agent.nomad("job", "stop", "-detach", "console-debian")
    wait_alloc(agent, "console-debian", {"complete"}, timeout=90)


def test_console_of_a_guest_without_agent(
    console_agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    agent = console_agent
    job = tmp_path / "console-tiny.nomad.hcl"
    job.write_text(
        TINY_JOB
        % {
            "kernel": tiny_guest.vmlinux,
            "initramfs": tiny_guest.initramfs,
            "cmdline": tiny_cmdline(tiny_guest.cmdline, TINY_SHELL),
        }
    )
    agent.nomad("job", "run", "-detach", str(job))
    alloc = str(wait_alloc(agent, "console-tiny", {"running"})["ID"])
    wait_in_logs(agent, alloc, "console-shell-ready", 120)

    term = console(agent, alloc)
    try:
        term.expect(b"attached to the serial console", 60)
        term.send(b"echo no-agent-$((7*6))\r")
        term.expect(b"no-agent-42", 60)
        assert console_clients(agent) == 1
        # The Nomad CLI's escape: ~. at the start of a line (the command's Enter was the last
        # key) ends the session. It tells the plugin nothing and makes the guest print nothing:
        # only the plugin's idle probe (driver_service.IDLE_PROBE) finds out the user has gone.
        term.send(b"~.")
        term.wait(30)
    finally:
        term.close()
    # ... and the plugin's session with it: the last one out lets go of the console.
    assert wait_until(lambda: console_clients(agent) == 0, 30)
    wait_in_logs(agent, alloc, "no-agent-42", 30)
    wait_alloc(agent, "console-tiny", {"running"}, timeout=5)
    # Still attachable after the CLI went away without a goodbye.
    term = console(agent, alloc)
    try:
        term.expect(b"attached to the serial console", 60)
        term.send(b"echo again-$((5*5))\r")
        term.expect(b"again-25", 60)
        term.send(b"\x1d")
        assert term.wait(30) == 0, term.output[-2000:]
    finally:
        term.close()
    agent.nomad("job", "stop", "-detach", "console-tiny")
    wait_alloc(agent, "console-tiny", {"complete"}, timeout=60)

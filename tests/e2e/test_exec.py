"""`nomad alloc exec` and a script check into a Debian VM, through the real Nomad agent."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO
from tests.e2e.conftest import run_debian_job, running_agent, wait_alloc
from tests.e2e.terminal import run_on_terminal

pytestmark = pytest.mark.e2e
JOB = REPO / "examples" / "debian.nomad.hcl"


@pytest.fixture(scope="module")
def debian_agent(debian_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([debian_guest.disk.parent]) as agent:
        yield agent


def test_alloc_exec_into_the_vm(debian_agent: DevAgent, debian_guest) -> None:  # type: ignore[no-untyped-def]
    agent = debian_agent
    run_debian_job(agent, JOB, debian_guest)
    alloc = str(wait_alloc(agent, "debian-vm", {"running"})["ID"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        events = agent.api(f"/v1/allocation/{alloc}")["TaskStates"]["vm"]["Events"]  # type: ignore[index]
        if any("Guest agent answered" in e["DisplayMessage"] for e in events):
            break
        time.sleep(2)
    else:
        pytest.fail(f"the guest agent never answered: {events}")

    exec_argv = [str(agent.config.nomad_binary), "alloc", "exec", "-t=false", "-task", "vm", alloc]
    done = subprocess.run(
        [*exec_argv, "/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
        env=agent.env,
        capture_output=True,
        timeout=120,
    )
    assert (done.stdout, done.stderr, done.returncode) == (b"out\n", b"err\n", 3), done
    piped = subprocess.run(
        [*exec_argv, "/bin/sh", "-c", "tr a-z A-Z"],
        input=b"through stdin\n",
        env=agent.env,
        capture_output=True,
        timeout=120,
    )
    assert (piped.stdout, piped.returncode) == (b"THROUGH STDIN\n", 0), piped
    # A program the guest does not have: a shell's 127 and the reason qemu-ga gave, on stderr.
    missing = subprocess.run(
        [*exec_argv, "no-such-program", "x"],
        stdin=subprocess.DEVNULL,
        env=agent.env,
        capture_output=True,
        timeout=120,
    )
    assert missing.returncode == 127, missing
    assert missing.stderr.startswith(b"nomad-vm: no-such-program: command not found"), missing
    assert b"No such file or directory" in missing.stderr, missing

    # Interactive: the CLI on a terminal of its own (40x120) gets a pty in the guest of that size.
    session = run_on_terminal(
        [*exec_argv[:3], "-t", *exec_argv[4:], "/bin/sh", "-c", "tty; stty size; exit 4"],
        agent.env,
        rows=40,
        cols=120,
    )
    assert session.returncode == 4, session
    assert b"/dev/pts/" in session.output and b"40 120" in session.output, session

    # The job's template reached the guest through the local/ share, mounted by cloud-init: wait
    # for the job's cmds (the last thing cloud-init runs) to show on the console first.
    deadline = time.monotonic() + 240
    while "hello from cloud-init" not in agent.nomad("alloc", "logs", alloc, "vm", check=False):
        assert time.monotonic() < deadline, "cloud-init did not finish within 240s"
        time.sleep(2)
    motd = subprocess.run(
        [*exec_argv, "cat", "/local/motd"], env=agent.env, capture_output=True, timeout=120
    )
    assert motd.stdout == f"Running as allocation {alloc}\n".encode(), motd

    agent.nomad("job", "stop", "-detach", "debian-vm")
    wait_alloc(agent, "debian-vm", {"complete"}, timeout=90)

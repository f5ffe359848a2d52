"""`nomad alloc exec` and a script check into a Debian VM, through the real Nomad agent."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.e2e.conftest import running_agent, wait_alloc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def debian_agent(debian_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([debian_guest.disk.parent]) as agent:
        yield agent


def _job(guest) -> str:  # type: ignore[no-untyped-def]
    return f"""
job "deb" {{
  group "g" {{
    task "vm" {{
      driver = "vm"
      config {{
        image     = "{guest.disk}"
        kernel    = "{guest.vmlinux}"
        initramfs = "{guest.initrd}"
        cmdline   = "{guest.cmdline}"
      }}
      resources {{
        cpu    = 1000
        memory = 1024
      }}
      kill_timeout = "30s"
    }}
  }}
}}
"""


def test_alloc_exec_into_the_vm(debian_agent: DevAgent, debian_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = debian_agent
    job = tmp_path / "deb.nomad.hcl"
    job.write_text(_job(debian_guest))
    agent.nomad("job", "run", "-detach", str(job))
    alloc = str(wait_alloc(agent, "deb", {"running"})["ID"])
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

    agent.nomad("job", "stop", "-detach", "deb")
    wait_alloc(agent, "deb", {"complete"}, timeout=90)

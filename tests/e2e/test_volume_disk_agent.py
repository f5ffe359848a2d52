"""`disk { volume = "<name>" }` through the real Nomad agent (1.11: it sends no volume names,
so the volume_mount's destination ends in the volume's name): a client host volume, a job
whose group mounts it and whose disk block names it. The first job's guest writes a marker to
the disk, which nomad-vm made in the volume's directory; the second job's guest reads it back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.guests.tiny import tiny_cmdline
from tests.e2e.conftest import running_agent, wait_alloc

pytestmark = pytest.mark.e2e

JOB = """
job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    volume "data" {{
      type   = "host"
      source = "vmdata"
    }}
    task "vm" {{
      driver = "vm"
      volume_mount {{
        volume      = "data"
        destination = "/volumes/data"
      }}
      config {{
        kernel    = "{kernel}"
        initramfs = "{initramfs}"
        cmdline   = "{cmdline}"
        disk {{
          volume = "data"
          size   = "8MiB"
          format = "raw"
        }}
      }}
      resources {{
        memory = 160
      }}
    }}
  }}
}}
"""


@pytest.fixture
def volume() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nvv-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def run(agent: DevAgent, guest: Any, name: str, command: str) -> str:
    """Run job ``name`` (the tiny guest running ``command``) to its end; its console log."""
    job = agent.config.workdir / f"{name}.nomad.hcl"
    cmdline = tiny_cmdline(guest.cmdline, command)
    job.write_text(
        JOB.format(name=name, kernel=guest.vmlinux, initramfs=guest.initramfs, cmdline=cmdline)
    )
    agent.nomad("job", "run", "-detach", str(job))
    alloc = wait_alloc(agent, name, {"complete", "failed"}, timeout=300)
    logs = agent.nomad("alloc", "logs", str(alloc["ID"]), "vm", check=False)
    events = [e.get("DisplayMessage") for e in alloc["TaskStates"]["vm"]["Events"]]  # type: ignore[index]
    assert alloc["ClientStatus"] == "complete", (events, logs[-2000:])
    return logs


def test_a_job_s_disk_lives_in_its_host_volume(volume: Path, tiny_guest: Any) -> None:
    with running_agent([tiny_guest.vmlinux.parent], host_volumes={"vmdata": volume}) as agent:
        write = "echo volume-marker | dd of=/dev/vda conv=fsync 2>/dev/null && echo wrote"
        assert "wrote" in run(agent, tiny_guest, "vol-write", write)
        assert sorted(p.name for p in volume.iterdir()) == ["nomad-vm-disk.raw"]
        logs = run(agent, tiny_guest, "vol-read", "head -c 13 /dev/vda; echo")
        assert "volume-marker" in logs, logs[-2000:]
    # The volume's data outlives the jobs and the agent.
    assert (volume / "nomad-vm-disk.raw").read_bytes().startswith(b"volume-marker")

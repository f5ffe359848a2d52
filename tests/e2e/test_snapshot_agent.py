"""snapshot_on_stop through a real Nomad agent: a tiny guest prints a counter; `nomad alloc
restart` stops the task (the plugin saves the VM into the task's local/ directory) and starts
it again in the same allocation (the plugin resumes it): `nomad alloc logs` shows the counter
going on from the next number, with no second boot. Then `nomad-vm vm snapshot` saves the
running VM through the plugin's control socket and it keeps counting. And with
`ephemeral_disk { sticky = true }`, an update that replaces the allocation carries the
snapshot to the new one, which resumes the VM."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.guests.tiny import tiny_cmdline
from tests.conftest import qemu_processes_under, wait_until
from tests.e2e.conftest import run_job, run_tiny_job, task_messages, wait_alloc, wait_until_empty
from tests.integration.test_control_socket import vm_json

pytestmark = pytest.mark.e2e
COUNTER = 'i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.2; done'
COUNT = re.compile(r"count (\d+)")
BANNER = "nomad-vm tiny guest: booted"

JOB = """
variable "kernel" { type = string }
variable "initramfs" { type = string }
variable "rev" {
  type    = string
  default = "1"
}

job "vm-snap" {
  type = "service"
  group "vm" {
    restart { attempts = 0 }
    # A new allocation replacing this one on the node gets its local/ directories.
    ephemeral_disk { sticky = true }
    task "tiny" {
      # Changed by the sticky test: a destructive update (a new allocation), same machine.
      meta { rev = var.rev }
      driver = "vm"
      config {
        kernel           = var.kernel
        initramfs        = var.initramfs
        cmdline          = "CMDLINE"
        snapshot_on_stop = true
        # The task's directories would be shared over virtio-fs, which QEMU cannot save.
        share_task_dirs  = false
      }
      resources {
        cpu    = 500
        memory = 160
      }
      kill_timeout = "30s"
    }
  }
}
"""


def _messages(agent: DevAgent, alloc_id: str) -> list[str]:
    return task_messages(agent, alloc_id, "tiny")


def _logs(agent: DevAgent, alloc_id: str) -> str:
    return agent.nomad("alloc", "logs", alloc_id, "tiny", check=False)


def _counts(text: str) -> list[int]:
    return [int(n) for n in COUNT.findall(text)]


def _counting_vm(agent: DevAgent, tiny_guest: Any, tmp_path: Path) -> str:
    """The job's allocation, once its guest has counted to 5."""
    job = tmp_path / "snap.nomad.hcl"
    job.write_text(JOB.replace("CMDLINE", tiny_cmdline(tiny_guest.cmdline, COUNTER)))
    run_tiny_job(agent, job, tiny_guest)
    alloc_id = str(wait_alloc(agent, "vm-snap", {"running"})["ID"])
    assert wait_until(lambda: max(_counts(_logs(agent, alloc_id)), default=0) >= 5, 180)
    return alloc_id


def test_alloc_restart_resumes_the_vm_where_it_was(
    agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    alloc_id = _counting_vm(agent, tiny_guest, tmp_path)

    agent.nomad("alloc", "restart", alloc_id, "tiny")
    assert wait_until(
        lambda: any(m.startswith("VM restored from snapshot") for m in _messages(agent, alloc_id)),
        120,
    ), _messages(agent, alloc_id)
    messages = _messages(agent, alloc_id)
    assert any(m.startswith("VM paused and saved") for m in messages), messages
    logs = _logs(agent, alloc_id)
    # Nomad's logmon appends the restarted task's output to the same log.
    last = max(_counts(logs))
    assert wait_until(lambda: max(_counts(_logs(agent, alloc_id))) >= last + 5, 60)
    seen = _counts(_logs(agent, alloc_id))
    # One sequence, no restart from 1, no gap; and one boot only.
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
    assert _logs(agent, alloc_id).count(BANNER) == 1
    task_dir = agent.config.workdir / "data" / "alloc" / alloc_id / "tiny"
    assert not (task_dir / "local" / ".nomad-vm-snapshot").exists()

    # The operator's snapshot: saved now, the VM runs on.
    saved = vm_json(agent.config.workdir / "plugin-data", "snapshot", alloc_id)
    assert saved["memory_bytes"] > 0 and saved["vm"]["state"] == "running", saved
    assert Path(saved["path"], "state").is_file()
    now = max(_counts(_logs(agent, alloc_id)))
    assert wait_until(lambda: max(_counts(_logs(agent, alloc_id))) >= now + 5, 60)

    agent.nomad("job", "stop", "-purge", "-detach", "vm-snap")
    assert wait_until(lambda: not qemu_processes_under(agent.config.workdir), 60)
    data_dir = agent.config.workdir / "plugin-data"
    assert wait_until_empty(data_dir, 30), sorted(data_dir.rglob("*"))


def test_a_sticky_replacement_allocation_resumes_the_vm(
    agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    first = _counting_vm(agent, tiny_guest, tmp_path)

    job = tmp_path / "snap.nomad.hcl"  # the same job, a new revision: a new allocation
    run_job(agent, job, kernel=tiny_guest.vmlinux, initramfs=tiny_guest.initramfs, rev="2")

    def replacement() -> str | None:
        allocs = agent.api("/v1/job/vm-snap/allocations")
        assert isinstance(allocs, list)
        running = [a for a in allocs if a["ID"] != first and a["ClientStatus"] == "running"]
        return str(running[0]["ID"]) if running else None

    assert wait_until(lambda: replacement() is not None, 180)
    second = str(replacement())
    assert wait_until(
        lambda: any(m.startswith("VM restored from snapshot") for m in _messages(agent, second)),
        60,
    ), _messages(agent, second)
    assert any(m.startswith("VM paused and saved") for m in _messages(agent, first))
    last = max(_counts(_logs(agent, first)))
    assert wait_until(lambda: len(_counts(_logs(agent, second))) >= 5, 60)
    seen = _counts(_logs(agent, second))
    # The new allocation's log starts where the old one's ended; its guest never booted.
    assert seen[:5] == list(range(last + 1, last + 6)), (last, seen[:10])
    assert BANNER not in _logs(agent, second)

    agent.nomad("job", "stop", "-purge", "-detach", "vm-snap")
    assert wait_until(lambda: not qemu_processes_under(agent.config.workdir), 60)
    data_dir = agent.config.workdir / "plugin-data"
    assert wait_until_empty(data_dir, 30), sorted(data_dir.rglob("*"))

"""A real (non-dev) Nomad agent restarted while a VM job runs: the same VM carries on."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO, qemu_processes_under
from tests.e2e.conftest import run_tiny_job, running_agent, wait_alloc, wait_until_empty

pytestmark = pytest.mark.e2e
JOB = REPO / "examples" / "demo.nomad.hcl"


@pytest.fixture(scope="module")
def server_agent(tiny_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([tiny_guest.vmlinux.parent], dev=False) as agent:
        yield agent


def _wait_for_stats(agent: DevAgent, alloc_id: str) -> tuple[float, int]:
    """CPU MHz and memory RSS as `nomad alloc status -stats` shows them, once non-zero."""
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = agent.nomad("alloc", "status", "-stats", alloc_id)
        usage = agent.api(f"/v1/client/allocation/{alloc_id}/stats")
        assert isinstance(usage, dict)
        tasks = usage.get("Tasks") or {}
        res = tasks.get("tiny", {}).get("ResourceUsage", {})
        ticks = res.get("CpuStats", {}).get("TotalTicks", 0)
        rss = res.get("MemoryStats", {}).get("RSS", 0)
        if ticks > 0 and rss > 0:
            assert re.search(r"\d+/500 MHz", text), text
            return ticks, rss
        time.sleep(1)
    raise AssertionError(f"no non-zero stats within 60s:\n{text}")


def test_agent_restart_keeps_the_same_vm_and_stop_cleans_up(
    server_agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    agent = server_agent
    run_tiny_job(agent, JOB, tiny_guest)
    alloc = wait_alloc(agent, "vm-demo", {"running"})
    alloc_id = str(alloc["ID"])
    (qemu,) = qemu_processes_under(agent.config.workdir)
    _, rss = _wait_for_stats(agent, alloc_id)
    assert rss > 10 * 1024 * 1024

    agent.restart()
    agent.wait_driver()
    assert qemu.is_running()
    time.sleep(5)  # give the restored task runner time to call RecoverTask
    assert [p.pid for p in qemu_processes_under(agent.config.workdir)] == [qemu.pid]
    after = wait_alloc(agent, "vm-demo", {"running"})
    assert after["ID"] == alloc_id
    _wait_for_stats(agent, alloc_id)  # stats flow again from the recovered task

    agent.nomad("job", "stop", "-detach", "vm-demo")
    wait_alloc(agent, "vm-demo", {"complete"}, timeout=60)
    deadline = time.monotonic() + 20
    while qemu_processes_under(agent.config.workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not qemu_processes_under(agent.config.workdir)
    data_dir = agent.config.workdir / "plugin-data"
    # The task's journal goes with DestroyTask, which Nomad sends after the VM has ended.
    assert wait_until_empty(data_dir, 20), sorted(data_dir.rglob("*"))
    events = agent.api(f"/v1/allocation/{alloc_id}")["TaskStates"]["tiny"]["Events"]  # type: ignore[index]
    messages = [e["DisplayMessage"] for e in events]
    # The stop went through the recovered plugin's QMP connection: a graceful ACPI stop.
    assert any("ACPI shutdown requested" in m for m in messages), messages
    assert not any("terminated" in m for m in messages), messages

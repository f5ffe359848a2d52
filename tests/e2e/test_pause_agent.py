"""Pause and resume through a real Nomad agent: `nomad alloc signal -s SIGSTOP / SIGCONT`, the
task events and CPU stats through Nomad's API, and `nomad job stop` of a paused VM."""

from __future__ import annotations

import time

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO, qemu_processes_under, wait_until
from tests.e2e.conftest import run_tiny_job, task_messages, wait_alloc, wait_until_empty
from tests.integration.test_control_socket import vm_json

pytestmark = pytest.mark.e2e
RUNNING = "nomad-vm tiny guest: running"


def _messages(agent: DevAgent, alloc_id: str) -> list[str]:
    return task_messages(agent, alloc_id, "tiny")


def _cpu_percent(agent: DevAgent, alloc_id: str) -> float:
    usage = agent.api(f"/v1/client/allocation/{alloc_id}/stats")
    assert isinstance(usage, dict)
    res = (usage.get("Tasks") or {}).get("tiny", {}).get("ResourceUsage", {})
    return float(res.get("CpuStats", {}).get("Percent", 0.0))


def _mean_percent(agent: DevAgent, alloc_id: str, samples: int) -> float:
    """The task's mean CPU percent over ``samples`` stats reads, one per Nomad collection
    interval (1 s). One read alone says little: the VMM's CPU time is counted in 10 ms clock
    ticks, so a single tick (a stats query answered by a paused QEMU) reads as 1 % of a second."""
    total = 0.0
    for _ in range(samples):
        total += _cpu_percent(agent, alloc_id)
        time.sleep(1)  # Nomad's own collection interval
    return total / samples


def test_sigstop_pauses_sigcont_resumes_and_job_stop_of_a_paused_vm(
    agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    run_tiny_job(agent, REPO / "examples" / "demo.nomad.hcl", tiny_guest)
    alloc_id = str(wait_alloc(agent, "vm-demo", {"running"})["ID"])
    assert wait_until(
        lambda: RUNNING in agent.nomad("alloc", "logs", alloc_id, "tiny", check=False), 180
    )
    # The guest runs: Nomad sees its VMM use CPU (TCG keeps it busy with timer interrupts).
    assert wait_until(lambda: _cpu_percent(agent, alloc_id) > 1.0, 30)
    running = _mean_percent(agent, alloc_id, 5)

    agent.nomad("alloc", "signal", "-s", "SIGSTOP", alloc_id, "tiny")
    assert wait_until(
        lambda: any(m.startswith("VM paused") for m in _messages(agent, alloc_id)), 30
    )
    assert wait_until(lambda: _cpu_percent(agent, alloc_id) < 0.5, 30)
    # The operator view of the plugin the agent runs agrees (nomad-vm vm list, its socket).
    (listed,) = vm_json(agent.config.workdir / "plugin-data", "list")
    assert (listed["alloc_id"], listed["state"]) == (alloc_id, "paused"), listed
    # Paused: at most a few clock ticks in five seconds, against the running guest's steady use.
    paused = _mean_percent(agent, alloc_id, 5)
    assert paused < min(1.0, running / 4), (paused, running)
    assert wait_alloc(agent, "vm-demo", {"running"})["ID"] == alloc_id

    agent.nomad("alloc", "signal", "-s", "SIGCONT", alloc_id, "tiny")
    assert wait_until(lambda: "VM resumed" in _messages(agent, alloc_id), 30)
    assert wait_until(lambda: _cpu_percent(agent, alloc_id) > 1.0, 30)

    agent.nomad("alloc", "signal", "-s", "SIGSTOP", alloc_id, "tiny")
    assert wait_until(
        lambda: sum(m.startswith("VM paused") for m in _messages(agent, alloc_id)) == 2, 30
    )
    agent.nomad("job", "stop", "-detach", "vm-demo")
    wait_alloc(agent, "vm-demo", {"complete"}, timeout=60)
    assert wait_until(lambda: not qemu_processes_under(agent.config.workdir), 20)
    data_dir = agent.config.workdir / "plugin-data"
    assert wait_until_empty(data_dir, 20), sorted(data_dir.rglob("*"))
    messages = _messages(agent, alloc_id)
    # Resumed first, so the guest saw the power button: a graceful stop, not a termination.
    assert any(m.startswith("VM resumed to be stopped") for m in messages), messages
    assert any("ACPI shutdown requested" in m for m in messages), messages
    assert not any("terminated" in m for m in messages), messages
    logs = agent.nomad("alloc", "logs", alloc_id, "tiny", check=False)
    assert "power button pressed" in logs, logs[-2000:]

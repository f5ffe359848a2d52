"""A real Nomad dev agent (loopback only) with nomad-driver-vm in its plugin_dir."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent, DevAgentConfig
from nomad_vm.cli.paths import nomad_binary
from tests.conftest import REPO, vm_processes_under


@contextlib.contextmanager
def running_agent(image_paths: list[Path], *, dev: bool = True) -> Iterator[DevAgent]:
    """A Nomad agent with our plugin, on loopback; everything it started is gone afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="nve-", dir="/tmp"))
    agent = DevAgent(
        DevAgentConfig(
            workdir=workdir,
            nomad_binary=nomad_binary(),
            driver_executable=REPO / ".venv" / "bin" / "nomad-driver-vm",
            image_paths=image_paths,
            dev=dev,
        )
    )
    agent.start()
    try:
        agent.wait_driver()
        yield agent
    finally:
        agent.stop()
        leftover = vm_processes_under(workdir)
        for proc in leftover:
            proc.kill()
        if leftover:
            print(f"killed QEMU processes left behind: {[p.pid for p in leftover]}")
        print(f"agent log: {agent.log_path}")
        agent.remove()


@pytest.fixture(scope="module")
def agent(tiny_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([tiny_guest.vmlinux.parent]) as dev:
        yield dev


def allocations(agent: DevAgent, job: str) -> list[dict[str, object]]:
    allocs = agent.api(f"/v1/job/{job}/allocations")
    assert isinstance(allocs, list)
    return allocs


def wait_alloc(
    agent: DevAgent, job: str, statuses: set[str], timeout: float = 180.0
) -> dict[str, object]:
    """Wait for the job's newest allocation to reach one of ``statuses``; return its details."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        allocs = allocations(agent, job)
        if allocs:
            newest = max(allocs, key=lambda a: int(a["CreateIndex"]))  # type: ignore[call-overload]
            last = newest["ClientStatus"]
            if last in statuses:
                full = agent.api(f"/v1/allocation/{newest['ID']}")
                assert isinstance(full, dict)
                return full
        time.sleep(0.5)
    raise TimeoutError(f"job {job}: allocation status {last}, wanted {statuses}")

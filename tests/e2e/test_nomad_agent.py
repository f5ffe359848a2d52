"""End to end through a real Nomad agent: fingerprint, a VM job, its logs, stop, bad jobs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import REPO, qemu_processes_under
from tests.e2e.conftest import run_tiny_job, wait_alloc, wait_until_empty
from tests.e2e.jobs import one_shot_job

pytestmark = pytest.mark.e2e
MARKER = "nomad-vm tiny guest: booted"


def test_node_reports_driver_vm_healthy_with_attributes(agent: DevAgent) -> None:
    info = agent.wait_driver()
    driver = info["driver"]
    assert isinstance(driver, dict)
    assert driver["Detected"] and driver["Healthy"]
    attrs = driver["Attributes"]
    assert attrs["driver.vm.version"]
    assert attrs["driver.vm.qemu.version"]
    assert attrs["driver.vm.accelerator"] in {"kvm", "tcg"}
    assert attrs["driver.vm.kvm"] in {"true", "false"}
    node = info["node"]
    assert isinstance(node, dict)
    assert node["Attributes"]["driver.vm"] == "1"


def test_vm_job_console_in_alloc_logs_and_stop_cleans_up(agent: DevAgent, tiny_guest) -> None:  # type: ignore[no-untyped-def]
    job = REPO / "examples" / "demo.nomad.hcl"
    run_tiny_job(agent, job, tiny_guest)
    alloc = wait_alloc(agent, "vm-demo", {"running"})
    deadline = time.monotonic() + 180
    logs = ""
    while MARKER not in logs and time.monotonic() < deadline:
        logs = agent.nomad("alloc", "logs", str(alloc["ID"]), "tiny", check=False)
        time.sleep(1)
    assert MARKER in logs, logs
    assert len(qemu_processes_under(agent.config.workdir)) == 1

    agent.nomad("job", "stop", "-detach", "vm-demo")
    stopped = wait_alloc(agent, "vm-demo", {"complete", "failed"}, timeout=60)
    # Give the task runner's DestroyTask a moment after the client status flips.
    deadline = time.monotonic() + 20
    while qemu_processes_under(agent.config.workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not qemu_processes_under(agent.config.workdir)
    data_dir = agent.config.workdir / "plugin-data"
    # The task's journal goes with DestroyTask, which Nomad sends after the VM has ended.
    assert wait_until_empty(data_dir, 20), sorted(data_dir.rglob("*"))
    alloc_dir = agent.config.workdir / "data" / "alloc" / str(stopped["ID"]) / "tiny"
    assert not list(alloc_dir.glob("nomad-vm*"))


def _bad_job(name: str, config_lines: str) -> str:
    return one_shot_job(name, config_lines)


@pytest.mark.parametrize(
    ("name", "config_lines", "expected"),
    [
        ("bad-kernel-path", '        kernel = "/etc/hostname"', "config.kernel"),
        ("bad-no-kernel", '        cmdline = "console=ttyS0"', "config.image"),
        ("bad-unknown-key", '        kernel = "/x"\n        kernal = "/y"', "kernal"),
    ],
)
def test_bad_job_fails_with_an_event_naming_the_field(
    agent: DevAgent, tmp_path: Path, name: str, config_lines: str, expected: str
) -> None:
    path = tmp_path / f"{name}.nomad.hcl"
    path.write_text(_bad_job(name, config_lines))
    agent.nomad("job", "run", "-detach", str(path))
    alloc = wait_alloc(agent, name, {"failed"}, timeout=60)
    events = alloc["TaskStates"]["vm"]["Events"]  # type: ignore[index]
    texts = [
        f"{e['Type']}: {e.get('DisplayMessage', '')} {e.get('DriverError', '')} "
        f"{e.get('ValidationError', '')}"
        for e in events
    ]
    assert any(expected in t for t in texts), texts
    assert not qemu_processes_under(agent.config.workdir)

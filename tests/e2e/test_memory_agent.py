"""Guest memory options through a real Nomad agent: the plugin's `ksm` block is accepted by
Nomad and reported as node attributes, a job's `free_page_reporting` reaches QEMU with its
RAM mergeable and the KSM task event, and `hugepages` without free huge pages fails the job
with an event naming it. ksmd is not touched (`start_ksmd = false`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.driver.ksm import KSM_SYSFS
from nomad_vm.vm.hugepages import hugepage_pool
from tests.conftest import qemu_processes_under, wait_until
from tests.e2e.conftest import running_agent, wait_alloc
from tests.e2e.jobs import one_shot_job

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not KSM_SYSFS.exists(), reason="this kernel has no KSM"),
]


@pytest.fixture(scope="module")
def mem_agent(tiny_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    extra = {"ksm": {"enabled": True, "start_ksmd": False}, "share_transport": "9p"}
    with running_agent([tiny_guest.vmlinux.parent], plugin_extra=extra) as dev:
        yield dev


def task_events(alloc: dict[str, object]) -> list[str]:
    events = alloc["TaskStates"]["vm"]["Events"]  # type: ignore[index]
    return [
        f"{e['Type']}: {e.get('DisplayMessage', '')} {e.get('DriverError', '')}" for e in events
    ]


def test_the_node_reports_ksm(mem_agent: DevAgent) -> None:
    attrs = mem_agent.wait_driver()["driver"]["Attributes"]  # type: ignore[index]
    assert attrs["driver.vm.ksm.enabled"] == "true"
    assert attrs["driver.vm.ksm.state"] in {"running", "stopped"}
    assert int(attrs["driver.vm.ksm.profit_bytes"]) >= 0
    assert attrs["driver.vm.ksm.profit_source"] in {"general_profit", "pages_sharing"}


def test_a_job_with_free_page_reporting_runs_mergeable(
    mem_agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    lines = (
        f'        kernel = "{tiny_guest.vmlinux}"\n'
        f'        initramfs = "{tiny_guest.initramfs}"\n'
        f'        cmdline = "{tiny_guest.cmdline}"\n'
        "        free_page_reporting = true"
    )
    path = tmp_path / "fpr.nomad.hcl"
    path.write_text(one_shot_job("fpr", lines, job_type="service"))
    mem_agent.nomad("job", "run", "-detach", str(path))
    try:
        wait_alloc(mem_agent, "fpr", {"running"}, timeout=120)
        (qemu,) = qemu_processes_under(mem_agent.config.workdir)
        argv = qemu.cmdline()
        assert any("free-page-reporting=on" in a for a in argv), argv
        assert any("mem-merge=on" in a for a in argv), argv

        def ksm_event() -> bool:
            alloc = wait_alloc(mem_agent, "fpr", {"running"}, timeout=10)
            return any("KSM: guest RAM is mergeable" in t for t in task_events(alloc))

        assert wait_until(ksm_event, 30, every=1), task_events(
            wait_alloc(mem_agent, "fpr", {"running"}, timeout=10)
        )
    finally:
        mem_agent.nomad("job", "stop", "-purge", "fpr", check=False)
    wait_until_gone(mem_agent)


def wait_until_gone(agent: DevAgent) -> None:
    assert wait_until(lambda: not qemu_processes_under(agent.config.workdir), 60)


def test_hugepages_without_free_pages_fails_naming_the_option(
    mem_agent: DevAgent,
    tiny_guest,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    if hugepage_pool()[1] * hugepage_pool()[0] >= 128 * 1024:
        pytest.skip("the host has enough free huge pages for the job")
    lines = (
        f'        kernel = "{tiny_guest.vmlinux}"\n'
        f'        initramfs = "{tiny_guest.initramfs}"\n'
        "        hugepages = true"
    )
    path = tmp_path / "huge.nomad.hcl"
    path.write_text(one_shot_job("huge", lines))
    mem_agent.nomad("job", "run", "-detach", str(path))
    alloc = wait_alloc(mem_agent, "huge", {"failed"}, timeout=60)
    texts = task_events(alloc)
    assert any("config.hugepages" in t and "free huge pages" in t for t in texts), texts
    assert not qemu_processes_under(mem_agent.config.workdir)

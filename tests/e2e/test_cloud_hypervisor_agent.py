"""Cloud Hypervisor through a real Nomad agent: the seed's `cloud_hypervisor {}` block accepted
as written by Nomad's config parser, a node without CH saying why in its attributes and failing
a CH job at once with that reason, a CH job run, logged, stopped and cleaned up, and a
`snapshot_on_stop` job resumed by `nomad alloc restart` where it was, with the fake
`cloud-hypervisor` executable as the VMM (a test of our plugin, not of CH)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import processes_under, wait_until
from tests.e2e.conftest import running_agent, task_messages, wait_alloc, wait_until_empty
from tests.e2e.jobs import one_shot_job
from tests.fakes.cloud_hypervisor import FAKE_CH, wrapper

pytestmark = pytest.mark.e2e

# As the nomad-driver-ch README writes it; no cloud-hypervisor is installed there on this host.
SEED_BLOCK = {
    "bin": "/usr/bin/cloud-hypervisor",
    "remote_bin": "/usr/bin/ch-remote",
    "virtiofsd_bin": "/usr/bin/virtiofsd",
    "default_kernel": "/boot/vmlinuz",
    "default_initramfs": "/boot/initramfs.img",
    "firmware": "/usr/share/qemu/OVMF.fd",
    "seccomp": "true",
    "log_file": "/var/log/cloud-hypervisor.log",
}
BOOTED = "fake cloud-hypervisor guest: booted"


def _job(name: str, kernel: Path, extra: str = "", cmdline: str = "console=ttyS0") -> str:
    lines = (
        '        hypervisor = "cloud-hypervisor"\n'
        f'        kernel     = "{kernel}"\n'
        f'        cmdline    = "{cmdline}"{extra}'
    )
    return one_shot_job(name, lines, job_type="service", kill_timeout="10s")


def _events(alloc: dict[str, Any]) -> list[str]:
    return [
        f"{e['Type']}: {e.get('DisplayMessage', '')} {e.get('DriverError', '')}"
        for e in alloc["TaskStates"]["vm"]["Events"]
    ]


def _ch_processes(agent: DevAgent) -> list[object]:
    return list(processes_under(agent.config.workdir, FAKE_CH))


def _fake_ch_agent(tiny_guest: Any, short_tmp: Path):  # type: ignore[no-untyped-def]
    # Where vm_user, which the fake CH runs as, can reach it (tmp_path is root's alone).
    fake = wrapper(short_tmp / "cloud-hypervisor")
    block = {"bin": str(fake), "trust_kvm": True}
    return running_agent([tiny_guest.vmlinux.parent], plugin_extra={"cloud_hypervisor": block})


def test_a_node_without_ch_says_why_and_fails_ch_jobs_at_once(
    tiny_guest: Any, tmp_path: Path
) -> None:
    with running_agent(
        [tiny_guest.vmlinux.parent], plugin_extra={"cloud_hypervisor": SEED_BLOCK}
    ) as agent:
        driver = agent.wait_driver()["driver"]
        assert isinstance(driver, dict)
        # QEMU (the default) runs; CH cannot, and the node says why.
        assert driver["Healthy"], driver
        attrs = driver["Attributes"]
        assert attrs["driver.vm.cloud_hypervisor.usable"] == "false"
        reason = attrs["driver.vm.cloud_hypervisor.reason"]
        assert "cloud_hypervisor.bin" in reason and "/usr/bin/cloud-hypervisor" in reason
        job = tmp_path / "ch-missing.nomad.hcl"
        job.write_text(_job("ch-missing", tiny_guest.vmlinux))
        agent.nomad("job", "run", "-detach", str(job))
        alloc = wait_alloc(agent, "ch-missing", {"failed"}, timeout=60)
        texts = _events(alloc)
        failure = [t for t in texts if t.startswith("Driver Failure")]
        assert (
            failure
            and "cloud_hypervisor.bin '/usr/bin/cloud-hypervisor' does not exist" in (failure[0])
        ), texts


def test_a_ch_job_runs_logs_stops_and_leaves_nothing(
    tiny_guest: Any, tmp_path: Path, short_tmp: Path
) -> None:
    with _fake_ch_agent(tiny_guest, short_tmp) as agent:
        attrs = agent.wait_driver()["driver"]["Attributes"]  # type: ignore[index]
        assert attrs["driver.vm.cloud_hypervisor.usable"] == "true"
        assert attrs["driver.vm.cloud_hypervisor.version"] == "53.0"
        job = tmp_path / "ch-job.nomad.hcl"
        job.write_text(_job("ch-job", tiny_guest.vmlinux))
        agent.nomad("job", "run", "-detach", str(job))
        alloc = wait_alloc(agent, "ch-job", {"running"}, timeout=120)

        def logs() -> str:
            return agent.nomad("alloc", "logs", str(alloc["ID"]), "vm", check=False)

        assert wait_until(lambda: BOOTED in logs(), 60, every=0.5), logs()
        assert len(_ch_processes(agent)) == 1
        agent.nomad("job", "stop", "-detach", "ch-job")
        stopped = wait_alloc(agent, "ch-job", {"complete", "failed"}, timeout=60)
        texts = _events(stopped)
        assert any("ACPI shutdown requested" in t for t in texts), texts
        assert any("Guest powered off" in t for t in texts), texts
        assert wait_until(lambda: not _ch_processes(agent), 20, every=0.5), _ch_processes(agent)
        data_dir = agent.config.workdir / "plugin-data"
        assert wait_until_empty(data_dir, 20), sorted(data_dir.rglob("*"))


COUNT = re.compile(r"count (\d+)")


def test_alloc_restart_resumes_a_ch_vm_from_its_snapshot(
    tiny_guest: Any, tmp_path: Path, short_tmp: Path
) -> None:
    """The fake VMM's guest counts in its memory (``fake.count=1``); the restart's stop saves
    it through vm.snapshot, the start restores it through vm.restore: one sequence, one boot."""
    with _fake_ch_agent(tiny_guest, short_tmp) as agent:
        job = tmp_path / "ch-snap.nomad.hcl"
        # The task's directories would be shared over virtio-fs, which CH cannot save.
        extra = "\n        snapshot_on_stop = true\n        share_task_dirs  = false"
        job.write_text(_job("ch-snap", tiny_guest.vmlinux, extra, "console=ttyS0 fake.count=1"))
        agent.nomad("job", "run", "-detach", str(job))
        alloc_id = str(wait_alloc(agent, "ch-snap", {"running"}, timeout=120)["ID"])

        def logs() -> str:
            return agent.nomad("alloc", "logs", alloc_id, "vm", check=False)

        def counts() -> list[int]:
            return [int(n) for n in COUNT.findall(logs())]

        assert wait_until(lambda: max(counts(), default=0) >= 5, 60, every=0.5), logs()
        agent.nomad("alloc", "restart", alloc_id, "vm")
        assert wait_until(
            lambda: any(
                m.startswith("VM restored from snapshot")
                for m in task_messages(agent, alloc_id, "vm")
            ),
            60,
        ), task_messages(agent, alloc_id, "vm")
        messages = task_messages(agent, alloc_id, "vm")
        assert any(m.startswith("VM paused and saved") for m in messages), messages
        last = max(counts())
        assert wait_until(lambda: max(counts()) >= last + 5, 60, every=0.5), logs()
        seen = counts()
        # Nomad's logmon appends the restarted task's output: one sequence, no gap, one boot.
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen
        assert logs().count(BOOTED) == 1
        task_dir = agent.config.workdir / "data" / "alloc" / alloc_id / "vm"
        assert not (task_dir / "local" / ".nomad-vm-snapshot").exists()
        assert len(_ch_processes(agent)) == 1
        agent.nomad("job", "stop", "-purge", "-detach", "ch-snap")
        assert wait_until(lambda: not _ch_processes(agent), 30, every=0.5), _ch_processes(agent)
        data_dir = agent.config.workdir / "plugin-data"
        assert wait_until_empty(data_dir, 30), sorted(data_dir.rglob("*"))

"""The Cloud Hypervisor backend where the conformance suite does not look: the host check and
the fingerprint, a task on a node where CH cannot run (it fails at once, saying why, leaving
nothing), CH failing at start (its own words in the error), the operator's shared log file,
and an end nobody asked for. The VMM is the fake executable (tests/fakes/cloud_hypervisor.py):
a test of our backend, not of CH."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.types import Health, TaskConfig, TaskResources
from nomad_vm.errors import ConfigError, HypervisorError, LaunchError, VMRequestError
from nomad_vm.vm.accel import KvmStatus
from nomad_vm.vm.capabilities import HostSettings
from nomad_vm.vm.cloud_hypervisor import backend
from nomad_vm.vm.cloud_hypervisor.binary import parse_version
from nomad_vm.vm.registry import BUILT_IN, HypervisorRegistry
from tests.fakes.cloud_hypervisor import wrapper

CH = "cloud-hypervisor"


def _driver(root: Path, **block: object) -> VMDriver:
    driver = VMDriver(backends=HypervisorRegistry(BUILT_IN, default="qemu"))
    (root / "images").mkdir(exist_ok=True)
    (root / "images" / "vmlinux").write_bytes(b"\0" * 512)
    ch = {"bin": str(wrapper(root / CH)), "trust_kvm": True, **block}
    config = {
        "data_dir": str(root / "data"),
        "image_paths": [str(root / "images")],
        "hypervisor": CH,
        "cloud_hypervisor": ch,
    }
    driver.set_config(config, None)
    return driver


def _driver_without_kvm(root: Path, monkeypatch: pytest.MonkeyPatch) -> VMDriver:
    """A plugin whose KVM probe finds what this host's does: KVM that runs no guests."""
    unusable = KvmStatus(False, "KVM does not run guest code at hardware speed")
    monkeypatch.setattr(backend, "probe_kvm", lambda: unusable)
    return _driver(root, trust_kvm=False)


def _task(root: Path, name: str, cmdline: str = "console=ttyS0") -> TaskConfig:
    alloc = root / name
    (alloc / "alloc" / "logs").mkdir(parents=True)
    (alloc / "t").mkdir()
    console = alloc / "alloc" / "logs" / "t.stdout"
    console.touch()
    return TaskConfig(
        id=f"a/t/{name}",
        name="t",
        alloc_id="a",
        alloc_dir=str(alloc),
        stdout_path=str(console),
        stderr_path="",
        resources=TaskResources(cpu_mhz=500, memory_mb=128),
        driver_config={
            "kernel": str(root / "images" / "vmlinux"),
            "cmdline": cmdline,
            "share_task_dirs": False,
        },
    )


def _nothing_left(root: Path, task: TaskConfig) -> None:
    assert JournalStore(root / "data").load(task.id) is None
    assert not list(Path(task.task_dir).glob("nomad-vm-*"))


def test_version_output_parses() -> None:
    assert parse_version("cloud-hypervisor v53.0\n") == "53.0"
    assert parse_version("cloud-hypervisor v41.0-12-gabcdef0") == "41.0"
    assert parse_version("something else") is None


def test_fingerprint_reports_the_version_and_whether_ch_can_run(short_tmp: Path) -> None:
    driver = _driver(short_tmp)

    async def first() -> dict[str, object]:
        async for found in driver.fingerprints():
            assert found.health == Health.HEALTHY, found.description
            return dict(found.attributes)
        raise AssertionError("no fingerprint")

    attrs = asyncio.run(first())
    assert attrs["driver.vm.cloud_hypervisor.version"] == "53.0"
    assert attrs["driver.vm.cloud_hypervisor.usable"] is True
    assert attrs["driver.vm.accelerator"] == "kvm"
    # Who CH runs as (the tests run as root: the default unprivileged user).
    assert attrs["driver.vm.cloud_hypervisor.vm_user"] == "nomad-vm"
    # QEMU is reported too, usable or not, with its reason.
    assert "driver.vm.qemu.usable" in attrs and "driver.vm.qemu.reason" in attrs


def test_without_the_binary_the_host_check_names_the_setting(short_tmp: Path) -> None:
    settings = HostSettings(
        str(short_tmp / "nope"), "auto", "auto", "", "nomad-vm", seccomp=True, trust_kvm=True
    )
    facts = backend.CloudHypervisor().check_host(settings)
    assert isinstance(facts.problem, HypervisorError)
    assert "cloud_hypervisor.bin" in str(facts.problem)


def test_a_task_on_a_node_where_ch_cannot_run_fails_at_once(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM that cannot run guests (this host's, as the probe finds it): CH has no emulation."""
    driver = _driver_without_kvm(short_tmp, monkeypatch)
    task = _task(short_tmp, "nokvm")
    with pytest.raises(HypervisorError) as caught:
        asyncio.run(driver.start_task(task))
    said = str(caught.value)
    assert "Cloud Hypervisor cannot run here" in said and "hardware speed" in said
    assert "trust_kvm" in said
    _nothing_left(short_tmp, task)


def test_the_fingerprint_says_why_ch_cannot_run_when_kvm_runs_no_guests(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _driver_without_kvm(short_tmp, monkeypatch)

    async def first() -> dict[str, object]:
        async for found in driver.fingerprints():
            return dict(found.attributes)
        raise AssertionError("no fingerprint")

    attrs = asyncio.run(first())
    assert attrs["driver.vm.cloud_hypervisor.usable"] is False
    reason = str(attrs["driver.vm.cloud_hypervisor.reason"])
    assert "hardware speed" in reason and "trust_kvm" in reason
    # The binary was found: its version is reported all the same.
    assert attrs["driver.vm.cloud_hypervisor.version"] == "53.0"


def test_trust_kvm_without_dev_kvm_says_it_does_not_exist(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "KVM_DEVICE", short_tmp / "no-kvm")
    settings = HostSettings(
        str(wrapper(short_tmp / CH)), "auto", "auto", "", "nomad-vm", seccomp=True, trust_kvm=True
    )
    facts = backend.CloudHypervisor().check_host(settings)
    assert isinstance(facts.problem, HypervisorError)
    said = str(facts.problem)
    assert "no-kvm does not exist" in said and "trust_kvm" in said


def test_a_missing_binary_fails_the_task_naming_the_setting(short_tmp: Path) -> None:
    driver = _driver(short_tmp, bin=str(short_tmp / "missing"))
    task = _task(short_tmp, "nobin")
    with pytest.raises(HypervisorError, match=r"cloud_hypervisor\.bin"):
        asyncio.run(driver.start_task(task))
    _nothing_left(short_tmp, task)


def test_a_disk_without_kernel_or_firmware_names_the_setting(short_tmp: Path) -> None:
    driver = _driver(short_tmp)
    task = _task(short_tmp, "nofw")
    disk = short_tmp / "images" / "disk.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    config = dict(task.driver_config or {})
    del config["kernel"], config["cmdline"]
    config.update(image=str(disk), firmware="uefi", cloud_init=False)
    task = TaskConfig(**{**task.__dict__, "driver_config": config})
    with pytest.raises(ConfigError) as caught:
        asyncio.run(driver.start_task(task))
    assert caught.value.field == "cloud_hypervisor.firmware"


def test_ch_failing_at_start_is_explained_in_its_own_words(short_tmp: Path) -> None:
    broken = short_tmp / "broken-ch"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "cloud-hypervisor v53.0"; exit 0; }\n'
        'echo "Error booting VM: cannot open /dev/kvm" >&2; exit 1\n'
    )
    broken.chmod(0o755)
    driver = _driver(short_tmp, bin=str(broken))
    task = _task(short_tmp, "broken")
    with pytest.raises(LaunchError, match="cannot open /dev/kvm"):
        asyncio.run(driver.start_task(task))
    _nothing_left(short_tmp, task)


def test_the_shared_log_file_is_appended_to(short_tmp: Path) -> None:
    log_file = short_tmp / "cloud-hypervisor.log"
    log_file.write_text("an earlier VM's line\n")
    broken = short_tmp / "broken-ch"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "cloud-hypervisor v53.0"; exit 0; }\n'
        'echo "this VM failed" >&2; exit 1\n'
    )
    broken.chmod(0o755)
    driver = _driver(short_tmp, bin=str(broken), log_file=str(log_file))
    with pytest.raises(LaunchError) as caught:
        asyncio.run(driver.start_task(_task(short_tmp, "logged")))
    # The error quotes this VM's lines only; the file keeps every VM's.
    assert "this VM failed" in str(caught.value) and "earlier" not in str(caught.value)
    assert log_file.read_text() == "an earlier VM's line\nthis VM failed\n"


def test_an_end_nobody_asked_for_is_a_failure(short_tmp: Path) -> None:
    """SIGTERM from outside: CH exits 0, but the guest did not power off."""
    driver = _driver(short_tmp)
    task = _task(short_tmp, "outside")

    async def scenario() -> None:
        await driver.start_task(task)
        journal = JournalStore(short_tmp / "data").load(task.id)
        assert journal is not None and journal.vmm is not None
        assert "--seccomp" in Path(f"/proc/{journal.vmm.pid}/cmdline").read_text()
        os.kill(journal.vmm.pid, signal.SIGTERM)
        result = await driver.wait_task(task.id)
        await driver.destroy_task(task.id, force=False)
        assert result.exit_code == 1 and "without the guest powering off" in result.err

    asyncio.run(scenario())
    _nothing_left(short_tmp, task)


def test_doctor_says_whether_ch_can_run_and_why_not(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nomad_vm.cli import doctor

    unusable = KvmStatus(False, "KVM does not run guest code at hardware speed")
    monkeypatch.setattr(backend, "probe_kvm", lambda: unusable)
    doctor._check_cloud_hypervisor(str(short_tmp / "missing"))
    doctor._check_cloud_hypervisor(str(wrapper(short_tmp / CH)))
    monkeypatch.setattr(backend, "probe_kvm", lambda: KvmStatus(True, "runs guests"))
    # CH runs as vm_user, which must be able to open /dev/kvm (whether this host's lets it is
    # the host's business: both answers are made here).
    no_access = VMRequestError("vm_user", "nomad-vm cannot open /dev/kvm")
    monkeypatch.setattr(backend, "check_kvm_access", _raiser(no_access))
    doctor._check_cloud_hypervisor(str(short_tmp / CH))
    monkeypatch.setattr(backend, "check_kvm_access", lambda user: None)
    doctor._check_cloud_hypervisor(str(short_tmp / CH))
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop(3) == "info  Cloud Hypervisor 53.0: vm_user: nomad-vm cannot open /dev/kvm"
    assert lines[0].startswith("info  Cloud Hypervisor: cloud_hypervisor.bin")
    assert lines[1] == (
        "info  Cloud Hypervisor would also need a KVM that runs guests: "
        "KVM does not run guest code at hardware speed"
    )
    assert lines[2].startswith("info  Cloud Hypervisor 53.0: Cloud Hypervisor cannot run here")
    assert lines[3].startswith("ok    Cloud Hypervisor 53.0 can run VMs here")


def _raiser(exc: Exception):  # type: ignore[no-untyped-def]
    def raise_it(*_: object) -> None:
        raise exc

    return raise_it

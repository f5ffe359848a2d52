"""The plugin's `ksm` block: parsing, what it writes to ksmd's sysfs files, and the node
attributes (a sysfs tree in a temporary directory stands in for /sys/kernel/mm/ksm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.ksm import (
    KsmOutcome,
    KsmPolicy,
    apply_ksm,
    ksm_attributes,
    ksm_start_event,
)
from nomad_vm.errors import ConfigError
from nomad_vm.vm.accel import AcceleratorChoice
from nomad_vm.vm.request import BackendPlan, VMPlan, VMRequest
from nomad_vm.vm.share_transport import ShareTransport
from nomad_vm.vm.spec import ShareSpec


def fake_sysfs(root: Path, **values: int) -> Path:
    defaults = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_sharing": 0,
                "pages_shared": 0}  # fmt: skip
    root.mkdir()
    for name, value in {**defaults, **values}.items():
        (root / name).write_text(f"{value}\n")
    return root


def test_the_block_parses_with_the_host_pace_left_alone_by_default(tmp_path: Path) -> None:
    config = parse_plugin_config({"data_dir": str(tmp_path), "ksm": {"enabled": True}})
    assert config.ksm == KsmPolicy(enabled=True, start_ksmd=True)
    assert parse_plugin_config({"data_dir": str(tmp_path)}).ksm == KsmPolicy(enabled=False)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"pages_to_scan": 0}, "config.ksm.pages_to_scan"),
        ({"sleep_millisecs": "fast"}, "config.ksm.sleep_millisecs"),
        ({"enabled": "yes"}, "config.ksm.enabled"),
    ],
)
def test_bad_values_name_their_field(tmp_path: Path, block: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_plugin_config({"data_dir": str(tmp_path), "ksm": block})
    assert err.value.field == field


def test_enabled_sets_the_pace_and_starts_ksmd(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm")
    policy = KsmPolicy(enabled=True, pages_to_scan=1000, sleep_millisecs=5)
    assert apply_ksm(policy, root) == KsmOutcome()
    assert [(root / n).read_text().strip() for n in ("run", "pages_to_scan", "sleep_millisecs")] \
        == ["1", "1000", "5"]  # fmt: skip


def test_host_tuning_is_left_alone_when_asked(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm")
    assert apply_ksm(KsmPolicy(enabled=True, start_ksmd=False), root) == KsmOutcome()
    assert [(root / n).read_text().strip() for n in ("run", "pages_to_scan", "sleep_millisecs")] \
        == ["0", "100", "20"]  # fmt: skip


def test_disabled_touches_nothing(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm")
    apply_ksm(KsmPolicy(enabled=False, pages_to_scan=5), root)
    assert (root / "run").read_text() == "0\n"
    assert (root / "pages_to_scan").read_text() == "100\n"


def test_a_kernel_without_ksm_is_reported_not_fatal(tmp_path: Path) -> None:
    missing = tmp_path / "ksm"
    outcome = apply_ksm(KsmPolicy(enabled=True), missing)
    assert outcome.problem is not None and "no KSM" in outcome.problem
    attrs = ksm_attributes(KsmPolicy(enabled=True), outcome, virtiofs=False, root=missing)
    assert attrs["driver.vm.ksm.state"] == "unavailable"
    assert "no KSM" in str(attrs["driver.vm.ksm.reason"])


def test_profit_comes_from_general_profit_or_pages_sharing(tmp_path: Path) -> None:
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    root = fake_sysfs(tmp_path / "ksm", run=1, pages_sharing=512)
    attrs = ksm_attributes(KsmPolicy(enabled=True), KsmOutcome(), virtiofs=False, root=root)
    assert attrs["driver.vm.ksm.profit_bytes"] == 512 * page
    assert attrs["driver.vm.ksm.profit_source"] == "pages_sharing"
    assert attrs["driver.vm.ksm.state"] == "running"
    (root / "general_profit").write_text("1048576\n")
    attrs = ksm_attributes(KsmPolicy(enabled=True), KsmOutcome(), virtiofs=True, root=root)
    assert attrs["driver.vm.ksm.profit_bytes"] == 1048576
    assert attrs["driver.vm.ksm.profit_mib"] == 1
    assert attrs["driver.vm.ksm.profit_source"] == "general_profit"
    assert "not merged" in str(attrs["driver.vm.ksm.virtiofs_guests"])


def test_a_sysfs_the_plugin_may_not_write_is_reported(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "ksm")
    (root / "run").unlink()
    (root / "run").mkdir()  # writing it fails (EISDIR), as a read-only sysfs would
    outcome = apply_ksm(KsmPolicy(enabled=True), root)
    assert outcome.problem is not None and "run" in outcome.problem


def plan(
    backend: str = "qemu", transport: str = "9p", shares: int = 1, hugepages: bool = False
) -> VMPlan:
    request = VMRequest("v", 1, 128, "x86_64", "pc", "bios", None, None, "", False,
                        hugepages=hugepages)  # fmt: skip
    share = ShareSpec("nomad-local", Path("/alloc/local"), "/local", False)
    return VMPlan(
        backend,
        request,
        Path("/run/v"),
        AcceleratorChoice("tcg", "test"),
        ShareTransport(transport, None, "test"),
        (share,) * shares,
        BackendPlan(),
    )


@pytest.mark.parametrize(
    ("vm", "says"),
    [
        (plan(), "KSM: guest RAM is mergeable"),
        (plan(transport="virtiofs", shares=0), "KSM: guest RAM is mergeable"),
        (plan(transport="virtiofs"), "not merging this VM's RAM: guest RAM shared with virtiofsd"),
        (plan(hugepages=True), "not merging this VM's RAM: it is on huge pages"),
        (plan(backend="cloud-hypervisor"), "not applied to cloud-hypervisor VMs"),
    ],
)
def test_the_task_event_says_whether_the_vms_ram_is_merged(vm: VMPlan, says: str) -> None:
    event = ksm_start_event(KsmPolicy(enabled=True), KsmOutcome(), vm)
    assert event is not None and says in event
    assert ksm_start_event(KsmPolicy(enabled=False), KsmOutcome(), vm) is None
    no_ksm = ksm_start_event(KsmPolicy(enabled=True), KsmOutcome("this kernel has no KSM"), vm)
    assert no_ksm == "KSM: not merging this VM's RAM: this kernel has no KSM"

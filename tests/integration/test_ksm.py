"""KSM through the real plugin with real QEMU: the plugin's `ksm` block starts ksmd with the
operator's pace, QEMU's guest RAM is marked mergeable (or, shared with virtiofsd, cannot be),
and the node and the task's events say so. ksmd is put back as it was (tests/ksm_host.py)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from nomad_vm.driver.ksm import KSM_SYSFS
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import REPO, processes_under
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import RUNNING, collect_events, destroy
from tests.ksm_host import ksm_block, ksm_restored, read

pytestmark = pytest.mark.skipif(not KSM_SYSFS.exists(), reason="this kernel has no KSM")
VIRTIOFSD = REPO / ".tools" / "bin" / "virtiofsd"
GUEST_MB = 160  # pluginkit.task_config's memory


def guest_ram_flags(qemu: psutil.Process) -> list[str]:
    """VmFlags of QEMU's guest RAM mapping (the one mapping of exactly the guest's size)."""
    flags, size = [], 0
    with open(f"/proc/{qemu.pid}/smaps") as smaps:
        for line in smaps:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and size == GUEST_MB * 1024:
                flags.append(line.split(":", 1)[1].strip())
    assert len(flags) == 1, f"expected one {GUEST_MB} MiB mapping, found {flags}"
    return flags[0].split()


def fingerprint(plugin: PluginProcess) -> dict[str, object]:
    stream = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    first = next(iter(stream))
    stream.cancel()
    out: dict[str, object] = {}
    for key, value in first.attributes.items():
        out[key] = getattr(value, value.WhichOneof("value") or "string_val")
    return out


def test_ksm_starts_ksmd_with_the_pace_and_marks_guest_ram_mergeable(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    with ksm_restored():
        stream, events = collect_events(plugin)
        options = {
            "ksm": ksm_block(pages_to_scan=333, sleep_millisecs=7),
            "share_transport": "9p",
        }
        with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="ksm", plugin_options=options) as (
            cfg,
            fifo,
            _,
        ):
            assert (read("run"), read("pages_to_scan"), read("sleep_millisecs")) == (1, 333, 7)
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            try:
                assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
                (qemu,) = processes_under(short_tmp, "qemu-system")
                assert any("mem-merge=on" in a for a in qemu.cmdline())
                assert "mg" in guest_ram_flags(qemu)
                attrs = fingerprint(plugin)
                assert attrs["driver.vm.ksm.enabled"] is True
                assert attrs["driver.vm.ksm.state"] == "running"
                assert attrs["driver.vm.ksm.pages_to_scan"] == 333
                assert "driver.vm.ksm.profit_bytes" in attrs
                assert "driver.vm.ksm.virtiofs_guests" not in attrs
            finally:
                destroy(plugin, cfg.id)
        stream.cancel()
        assert "KSM: guest RAM is mergeable" in events, events


@pytest.mark.skipif(not VIRTIOFSD.exists(), reason="no virtiofsd built (make virtiofsd)")
def test_a_virtiofs_guest_is_not_merged_and_the_operator_is_told(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Guest RAM shared with virtiofsd is a shared mapping, which the kernel never merges
    even with QEMU's merge=on: the fingerprint and the task's event say so."""
    with ksm_restored():
        stream, events = collect_events(plugin)
        options = {
            "ksm": ksm_block(start_ksmd=False),
            "share_transport": "virtiofs",
            "virtiofsd_binary": str(VIRTIOFSD),
        }
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="ksmfs", plugin_options=options
        ) as (cfg, fifo, _):
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            try:
                assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
                (qemu,) = processes_under(short_tmp, "qemu-system")
                assert any("share=on,merge=on" in a for a in qemu.cmdline())
                flags = guest_ram_flags(qemu)
                assert "sh" in flags and "mg" not in flags, flags
                attrs = fingerprint(plugin)
                assert "not merged" in str(attrs["driver.vm.ksm.virtiofs_guests"])
            finally:
                destroy(plugin, cfg.id)
        stream.cancel()
        assert any(m.startswith("KSM: not merging this VM's RAM: guest RAM shared") for m in events)

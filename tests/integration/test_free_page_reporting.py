"""Free page reporting through the real plugin with real QEMU: a guest that fills 200 MiB of
its memory and frees it gives it back to the host (its VMM's RSS falls)."""

from __future__ import annotations

import time
from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under
from tests.free_pages import FILL_AND_FREE, FILL_MB, GUEST_MB, MIB, follow
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import destroy


def test_memory_the_guest_frees_goes_back_to_the_host(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    overrides = {"free_page_reporting": True}
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="fpr", run=FILL_AND_FREE, overrides=overrides
    ) as (cfg, fifo, _):
        cfg.resources.allocated_resources.memory.memory_mb = GUEST_MB
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            (qemu,) = processes_under(short_tmp, "qemu-system")
            assert any("free-page-reporting=on" in a for a in qemu.cmdline())
            samples = follow(fifo, qemu, time.monotonic() + 240, settle=60)
        finally:
            destroy(plugin, cfg.id)
    # The fill reached the host (else the test would prove nothing), then left it.
    assert samples.filled - samples.base >= FILL_MB * MIB * 3 // 4, samples
    assert samples.after <= samples.filled - FILL_MB * MIB * 3 // 4, samples

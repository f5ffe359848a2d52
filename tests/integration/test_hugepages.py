"""Hugepages through the real plugin with real QEMU: the guest's RAM comes out of the host's
huge page pool, and a task that does not fit is refused naming `hugepages` with nothing left
behind. The test reserves huge pages (vm.nr_hugepages) and restores the previous value."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.hugepages import hugepage_pool
from tests.conftest import vm_processes_under
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import RUNNING, destroy

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_MB = 160  # pluginkit.task_config's memory


@contextlib.contextmanager
def reserved(extra: int) -> Iterator[None]:
    """``extra`` more huge pages in the pool, the previous size restored afterwards."""
    before = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(f"{before + extra}\n")
    try:
        yield
    finally:
        NR_HUGEPAGES.write_text(f"{before}\n")


def free_pages() -> int:
    return hugepage_pool()[1]


def test_guest_ram_comes_from_the_huge_page_pool(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    size_kib, _ = hugepage_pool()
    needed = GUEST_MB * 1024 // size_kib
    with reserved(needed + 8):
        if free_pages() < needed:
            pytest.skip("the kernel could not reserve enough huge pages (fragmented memory)")
        before = free_pages()
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="huge", overrides={"hugepages": True}
        ) as (cfg, fifo, _):
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            try:
                assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
                # Preallocated at start: the whole guest is in the pool, not just what it used.
                assert before - free_pages() == needed
            finally:
                destroy(plugin, cfg.id)
        assert free_pages() == before


def test_a_task_that_does_not_fit_is_refused_naming_the_option(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    size_kib, free = hugepage_pool()
    needed = GUEST_MB * 1024 // size_kib
    if free >= needed:
        pytest.skip("the host already has enough free huge pages for the guest")
    with (
        tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="nohuge", overrides={"hugepages": True}
        ) as (cfg, _, alloc),
        pytest.raises(grpc.RpcError) as caught,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    message = caught.value.details() or ""
    assert "config.hugepages" in message and f"need {needed} free huge pages" in message, message
    assert not vm_processes_under(short_tmp)
    assert not list((alloc / "tiny").glob("nomad-vm-*")), "a runtime directory was left"

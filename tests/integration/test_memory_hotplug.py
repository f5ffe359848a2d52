"""Nomad's memory_max as hot-pluggable memory (virtio-mem), driven, through the real plugin
with real QEMU: a tiny guest of 256 MB (memory_max 768) fills 400 MiB of a tmpfs step by
step; the driver plugs memory as it runs short, the fill completes without an OOM kill; the
guest frees it, the driver unplugs it all within a bounded time, and QEMU's RSS falls.

The shared tiny guest has no virtio_mem module: the test boots a variant of its initramfs
with it (tests/vmem_initrd.py), and tells the guest kernel to online plugged memory as
movable (``memhp_default_state=online_movable``), which the guest needs to unplug it again.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import guest_cache, processes_under
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import collect_events, destroy
from tests.vmem_initrd import build_vmem_initramfs

MIB = 2**20
BOOT_MB, MAX_MB = 256, 768
FILL_MIB = 400
MARK = "nomad-vm vmem:"
# 4 MiB every 0.2 s (about 20 MiB/s): a workload that grows, not a burst (docs/memory.md:
# the driver reacts in 2-3 s). The fill is held 20 s, then freed.
FILL = (
    "mkdir -p /mnt/fill && mount -t tmpfs -o size=600m tmpfs /mnt/fill; "
    f"echo '{MARK} base'; ok=1; i=0; "
    f"while [ $i -lt {FILL_MIB // 4} ]; do "
    "dd if=/dev/zero of=/mnt/fill/f$i bs=1M count=4 2>/dev/null || { ok=0; break; }; "
    "i=$((i+1)); sleep 0.2; done; "
    f"echo \"{MARK} filled ok=$ok oom=$(dmesg | grep -ci 'out of memory') "
    '$(grep MemTotal /proc/meminfo)"; '
    f"sleep 20; rm -f /mnt/fill/*; echo '{MARK} freed'; "
    f'while :; do echo "{MARK} $(grep MemTotal /proc/meminfo)"; sleep 5; done'
)
CMDLINE_EXTRA = "memhp_default_state=online_movable"
# The plugin's memory_hotplug.shrink_after (10 s by default): shorter, so that unplugging
# several steps does not dominate the test.
SHRINK_AFTER = 2
PLUGIN_OPTIONS: dict[str, object] = {"memory_hotplug": {"shrink_after": SHRINK_AFTER}}


def attributes(plugin: PluginProcess, task_id: str) -> dict[str, str]:
    reply = drv(plugin).InspectTask(driver_pb2.InspectTaskRequest(task_id=task_id))
    return dict(reply.driver.attributes)


def test_memory_max_is_plugged_when_needed_and_unplugged_when_freed(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    _, events = collect_events(plugin)
    with vmem_task(plugin, short_tmp, tiny_guest, "vmem") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            (qemu,) = processes_under(short_tmp, "qemu-system")
            argv = qemu.cmdline()
            assert f"{BOOT_MB}M,maxmem={MAX_MB}M" in argv
            assert any(a.startswith("virtio-mem-pci,id=vmem0,") for a in argv)
            deadline = time.monotonic() + 300
            assert fifo.wait_for(f"{MARK} base".encode(), 120), fifo.data[-2000:]
            assert attributes(plugin, cfg.id)["memory.plugged_bytes"] == "0"
            assert fifo.wait_for(f"{MARK} filled".encode(), deadline - time.monotonic()), (
                fifo.data[-3000:],
                events,
            )
            filled_rss = qemu.memory_info().rss
            peak = attributes(plugin, cfg.id)
            line = re.search(rb"filled ok=(\d) oom=(\d+) MemTotal: +(\d+) kB", fifo.data)
            assert line is not None, fifo.data[-2000:]
            ok, oom, total_kib = (int(g) for g in line.groups())
            # The fill succeeded with no OOM kill, in a guest that grew beyond its boot size.
            assert (ok, oom) == (1, 0), fifo.data[-3000:]
            assert total_kib * 1024 > BOOT_MB * MIB, total_kib
            plugged = int(peak["memory.plugged_bytes"])
            assert plugged >= (FILL_MIB - BOOT_MB // 2) * MIB, peak
            assert int(peak["memory.hotplug_region_bytes"]) == (MAX_MB - BOOT_MB) * MIB
            assert any(e.startswith("Memory plugged: +128 MiB") for e in events), events
            assert fifo.wait_for(f"{MARK} freed".encode(), deadline - time.monotonic())
            freed_at = time.monotonic()
            # Unplugged in steps of 128 MiB, each after SHRINK_AFTER s of plenty.
            unplug_deadline = freed_at + unplug_bound(plugged)
            while attributes(plugin, cfg.id)["memory.plugged_bytes"] != "0":
                assert time.monotonic() < unplug_deadline, (attributes(plugin, cfg.id), events)
                time.sleep(1)
            unplugged_after = time.monotonic() - freed_at
            after_rss = rss_settled(qemu, filled_rss - plugged * 3 // 4, time.monotonic() + 30)
        finally:
            destroy(plugin, cfg.id)
    assert any(e.startswith("Memory unplugged: -128 MiB") for e in events), events
    # The last step brought the guest back to its boot size.
    assert any(
        e.startswith("Memory unplugged") and f"now {BOOT_MB} MiB of up to {MAX_MB}" in e
        for e in events
    ), events
    # The host got the unplugged memory back.
    assert after_rss <= filled_rss - plugged * 3 // 4, (filled_rss, after_rss, plugged)
    print(
        f"plugged {plugged // MIB} MiB; unplugged {unplugged_after:.0f} s after the free; "
        f"QEMU RSS {filled_rss // MIB} -> {after_rss // MIB} MiB"
    )


def unplug_bound(plugged: int) -> float:
    """Seconds within which ``plugged`` bytes are unplugged once the guest freed them: a step
    per SHRINK_AFTER seconds of plenty, the balloon's figures' lag, and a margin for a busy
    host."""
    return (SHRINK_AFTER + 5) * (plugged // (128 * MIB)) + 30


def rss_settled(qemu: psutil.Process, target: int, deadline: float) -> int:
    """QEMU's RSS once it is at or below ``target``, or the lowest seen by ``deadline``."""
    lowest = qemu.memory_info().rss
    while lowest > target and time.monotonic() < deadline:
        time.sleep(0.5)
        lowest = min(lowest, qemu.memory_info().rss)
    return lowest


@contextlib.contextmanager
def vmem_task(
    plugin: PluginProcess,
    root: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    alloc_name: str,
) -> Iterator[tuple[driver_pb2.TaskConfig, FifoReader, list[str]]]:
    """The filling guest's task (256 MB, memory_max 768), its console, and the image paths
    the plugin must allow (the tiny guest's and the test initramfs's directories)."""
    from nomad_vm.guests.tiny import tiny_cmdline

    initrd_dir = root / "initrd"
    initramfs = build_vmem_initramfs(tiny_guest, guest_cache() / "debs", initrd_dir)
    overrides = {
        "initramfs": str(initramfs),
        "cmdline": tiny_cmdline(f"{tiny_guest.cmdline} {CMDLINE_EXTRA}", FILL),
    }
    paths = [str(tiny_guest.vmlinux.parent), str(initrd_dir)]
    with tiny_task(
        plugin,
        root,
        tiny_guest,
        alloc_name=alloc_name,
        overrides=overrides,
        image_paths=paths,
        plugin_options=PLUGIN_OPTIONS,
    ) as (cfg, fifo, _):
        memory = cfg.resources.allocated_resources.memory
        memory.memory_mb, memory.memory_max_mb = BOOT_MB, MAX_MB
        yield cfg, fifo, paths


def test_a_restarted_plugin_unplugs_from_the_size_qemu_holds(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The first plugin plugs memory and is SIGKILLed while the guest holds it; the second
    one reattaches, reads the device's size back from QEMU and unplugs it all."""
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second: PluginProcess | None = None
    try:
        with vmem_task(first, short_tmp, tiny_guest, "vmemr") as (cfg, fifo, paths):
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
            assert fifo.wait_for(f"{MARK} filled".encode(), 300), fifo.data[-3000:]
            held = int(attributes(first, cfg.id)["memory.plugged_bytes"])
            assert held > 0
            found = held
            first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.wait_exit(5)
            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", paths, **PLUGIN_OPTIONS)
            _, events = collect_events(second)
            recover(second, handle)
            try:
                # Read back from QEMU at once: the new plugin was never told the size (the
                # first may have plugged more after ``held`` was read, never less: the
                # guest still holds its fill).
                deadline = time.monotonic() + 10
                while int(attributes(second, cfg.id).get("memory.plugged_bytes", "0")) < held:
                    assert time.monotonic() < deadline, attributes(second, cfg.id)
                    time.sleep(0.2)
                held = int(attributes(second, cfg.id)["memory.plugged_bytes"])
                assert fifo.wait_for(f"{MARK} freed".encode(), 120), fifo.data[-2000:]
                deadline = time.monotonic() + unplug_bound(held)
                while attributes(second, cfg.id)["memory.plugged_bytes"] != "0":
                    assert time.monotonic() < deadline, (attributes(second, cfg.id), events)
                    time.sleep(1)
            finally:
                destroy(second, cfg.id)
        assert any(e.startswith("Memory unplugged") for e in events), events
        # A plugin that had forgotten the size would plug from nothing again ("+128 MiB
        # (guest now 384 MiB ..."); a guest still short after its fill may be given more
        # than it held (the first plugin waits for each step to show in the guest's total
        # before the next, so it can be killed one step short), never less.
        plugged_to = [
            int(m.group(1))
            for e in events
            if (m := re.match(r"Memory plugged: .* now (\d+) MiB", e)) is not None
        ]
        assert all(size > BOOT_MB + found // MIB for size in plugged_to), (found, events)
    finally:
        first.kill()
        if second is not None:
            second.kill()

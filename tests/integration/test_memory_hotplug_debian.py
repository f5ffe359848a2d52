"""Nomad's memory_max on an ordinary cloud-init Debian guest, through the real plugin with real
QEMU: nothing on the guest's kernel command line tells it to online hot-plugged memory
(Debian's kernel leaves it offline); the plugin's cloud-init seed does, merged with the user's
own user-data. The guest (512 MB, memory_max 1024) fills 480 MiB of a tmpfs step by step;
the driver plugs memory as it runs short, the memory lands in ZONE_MOVABLE, the fill completes
without an OOM kill; the guest frees it, and the driver unplugs it all within a bounded time.

Slow (a Debian boot under TCG is about a minute or two): one VM.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under, wait_until
from tests.integration.pluginkit import FifoReader, configure, debian_boot, drv, task_config
from tests.integration.test_debian_task import run
from tests.integration.test_memory_hotplug import (
    PLUGIN_OPTIONS,
    attributes,
    rss_settled,
    unplug_bound,
)
from tests.integration.test_vm_lifecycle import collect_events, destroy

MIB = 2**20
BOOT_MB, MAX_MB = 512, 1024
FILL_MIB = 480
MARK = "nomad-vm vmem:"
# The user's own document, with its own bootcmd: the plugin's must survive the merge.
USER_DATA = """#cloud-config
bootcmd:
  - echo from-user > /run/user-bootcmd
"""
# 4 MiB every 0.5 s (under 8 MiB/s: a Debian guest under TCG, on a host shared with other
# work, plugs and onlines a step in several seconds), held 10 s, then freed.
# Started through the guest agent, detached; each report opens the console anew (a getty
# starting on it hangs up whatever had it open before).
FILL = (
    "mkdir -p /mnt/fill && mount -t tmpfs -o size=900m tmpfs /mnt/fill; ok=1; i=0; "
    f"while [ $i -lt {FILL_MIB // 4} ]; do "
    "dd if=/dev/zero of=/mnt/fill/f$i bs=1M count=4 2>/dev/null || { ok=0; break; }; "
    "i=$((i+1)); sleep 0.5; done; "
    "movable=$(awk '/zone +Movable/ {z=1} z && /managed/ {print $2; exit}' /proc/zoneinfo); "
    f"echo \"{MARK} filled ok=$ok oom=$(dmesg | grep -ci 'out of memory') "
    'movable=${movable:-0} $(grep MemTotal /proc/meminfo)" > /dev/ttyS0; '
    f"sleep 10; rm -f /mnt/fill/*; echo '{MARK} freed' > /dev/ttyS0"
)


def test_debian_guest_onlines_plugged_memory_through_the_seed(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)], **PLUGIN_OPTIONS)
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "web").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {**debian_boot(debian_guest), "user_data": USER_DATA}
    assert "memhp_default_state" not in str(config["cmdline"])
    cfg = task_config(alloc, config, task_id="alloc/web/vmemdeb")
    cfg.name = "web"
    memory = cfg.resources.allocated_resources.memory
    memory.memory_mb, memory.memory_max_mb = BOOT_MB, MAX_MB
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        (qemu,) = processes_under(short_tmp, "qemu-system")
        assert f"{BOOT_MB}M,maxmem={MAX_MB}M" in qemu.cmdline()
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 300), events
        # The agent may answer before cloud-init's bootcmd has run: wait for the seed's
        # setting, then check that the user's own bootcmd ran too (the documents merged).
        auto_online = "cat /sys/devices/system/memory/auto_online_blocks"
        assert wait_until(
            lambda: run(plugin, cfg.id, auto_online)[0] == b"online_movable\n", 120, every=2
        ), run(plugin, cfg.id, auto_online)
        assert run(plugin, cfg.id, "cat /run/user-bootcmd") == (b"from-user\n", 0)
        assert b"memhp_default_state" not in run(plugin, cfg.id, "cat /proc/cmdline")[0]
        assert attributes(plugin, cfg.id)["memory.plugged_bytes"] == "0"
        # The end of the boot (its getty), so that the boot's own work is not measured too.
        assert fifo.wait_for(b"login:", 300), bytes(fifo.data[-2000:])
        start = f"setsid sh -c {shlex.quote(FILL)} </dev/null >/dev/null 2>&1 &"
        assert run(plugin, cfg.id, start) == (b"", 0)
        deadline = time.monotonic() + 420
        assert fifo.wait_for(f"{MARK} filled".encode(), deadline - time.monotonic()), (
            bytes(fifo.data[-3000:]),
            events,
        )
        filled_rss = qemu.memory_info().rss
        peak = attributes(plugin, cfg.id)
        line = re.search(rb"filled ok=(\d) oom=(\d+) movable=(\d+) MemTotal: +(\d+) kB", fifo.data)
        assert line is not None, bytes(fifo.data[-2000:])
        ok, oom, movable_pages, total_kib = (int(g) for g in line.groups())
        # The fill succeeded with no OOM kill, in a guest that grew beyond its boot size,
        # and what it got is movable (so it can be unplugged again).
        assert (ok, oom) == (1, 0), bytes(fifo.data[-3000:])
        assert total_kib * 1024 > BOOT_MB * MIB, total_kib
        plugged = int(peak["memory.plugged_bytes"])
        assert plugged >= 128 * MIB, (peak, events)
        assert movable_pages * 4096 >= plugged // 2, (movable_pages, plugged)
        assert any(e.startswith("Memory plugged: +128 MiB") for e in events), events
        assert fifo.wait_for(f"{MARK} freed".encode(), deadline - time.monotonic())
        freed_at = time.monotonic()
        # Unplugged in steps of 128 MiB, each after SHRINK_AFTER s of plenty.
        unplug_within = unplug_bound(plugged)
        assert wait_until(
            lambda: attributes(plugin, cfg.id)["memory.plugged_bytes"] == "0",
            unplug_within,
            every=1,
        ), (attributes(plugin, cfg.id), events)
        assert not any(e.startswith("Memory hot-plug stopped") for e in events), events
        unplugged_after = time.monotonic() - freed_at
        after_rss = rss_settled(qemu, filled_rss - plugged // 4, time.monotonic() + 30)
        # The host got (some of) the unplugged memory back: what the guest had touched.
        assert after_rss <= filled_rss - plugged // 4, (filled_rss, after_rss, plugged)
        check_a_guest_that_stops_onlining(plugin, cfg.id, fifo, events)
    finally:
        destroy(plugin, cfg.id)
        stream.cancel()
        fifo.close()
    assert any(
        e.startswith("Memory unplugged") and f"now {BOOT_MB} MiB of up to {MAX_MB}" in e
        for e in events
    ), events
    print(
        f"plugged {plugged // MIB} MiB (guest total {total_kib // 1024} MiB, "
        f"{movable_pages * 4096 // MIB} MiB movable); unplugged {unplugged_after:.0f} s after "
        f"the free; QEMU RSS {filled_rss // MIB} -> {after_rss // MIB} MiB"
    )


# The guest stops onlining (as Debian's kernel does without the seed's bootcmd), then leaves
# itself less than the policy's 80 MiB headroom, and holds it.
SHORT = (
    "echo offline > /sys/devices/system/memory/auto_online_blocks; "
    "a=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo); "
    "mkdir -p /mnt/held && mount -t tmpfs -o size=900m tmpfs /mnt/held; "
    "dd if=/dev/zero of=/mnt/held/f bs=1M count=$((a - 40)) 2>/dev/null; "
    f'echo "{MARK} short $(grep MemAvailable /proc/meminfo)" > /dev/ttyS0'
)


def check_a_guest_that_stops_onlining(
    plugin: PluginProcess, task_id: str, fifo: FifoReader, events: list[str]
) -> None:
    """The driver plugs one step, sees that it never shows in the guest's total, unplugs it
    and says why, once."""
    start = f"setsid sh -c {shlex.quote(SHORT)} </dev/null >/dev/null 2>&1 &"
    assert run(plugin, task_id, start) == (b"", 0)
    assert fifo.wait_for(f"{MARK} short".encode(), 120), bytes(fifo.data[-2000:])
    stopped = "Memory hot-plug stopped: the guest plugged 128 MiB but its total memory grew by"
    # One step plugged, then 30 s of the guest's reports, then the event.
    assert wait_until(lambda: any(e.startswith(stopped) for e in events), 180, every=1), events
    assert wait_until(
        lambda: attributes(plugin, task_id)["memory.plugged_bytes"] == "0", 60, every=1
    ), attributes(plugin, task_id)
    assert sum(e.startswith("Memory hot-plug stopped") for e in events) == 1, events
    (event,) = (e for e in events if e.startswith(stopped))
    assert "Unplugging its 128 MiB" in event and "docs/memory.md" in event, event
    assert run(plugin, task_id, "rm /mnt/held/f") == (b"", 0)

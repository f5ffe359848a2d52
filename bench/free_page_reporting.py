"""What free page reporting gives back: two tiny guests under one plugin, one with the task's
`free_page_reporting = true` and one without, each filling 1 GiB of its memory (a file in its
tmpfs; --fill-mb to change) and freeing it. Printed: each VMM's RSS before, filled, and after
the free (the lowest within --settle seconds), and the share of the fill the host got back.

Run: .venv/bin/python bench/free_page_reporting.py [--settle 30] [--fill-mb 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nomad_vm.guests.tiny import build_tiny, tiny_cmdline  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from tests.conftest import guest_cache, processes_under, qemu_processes_under  # noqa: E402
from tests.free_pages import MIB, Samples, fill_and_free, follow, guest_mb_for  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=30, help="seconds to wait after free")
    parser.add_argument("--fill-mb", type=int, default=1024, help="MiB each guest fills")
    args = parser.parse_args()
    fill_mb, guest_mb = args.fill_mb, guest_mb_for(args.fill_mb)
    guest = build_tiny(guest_cache())
    print(f"free page reporting: tiny guests of {guest_mb} MB filling {fill_mb} MiB; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.uname().nodename}, "
          f"kernel {os.uname().release}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nvm-", dir="/tmp") as tmp:
        root = Path(tmp)
        plugin = PluginProcess([str(DRIVER)])
        plugin.start(root / "plugin.stderr")
        fifos: list[FifoReader] = []
        ids: list[str] = []
        results: dict[bool, Samples] = {}
        try:
            configure(plugin, root / "data", [str(guest.vmlinux.parent)])
            threads = []
            for reporting in (True, False):
                alloc = root / ("on" if reporting else "off")
                (alloc / "tiny").mkdir(parents=True)
                fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
                fifos.append(fifo)
                config = {
                    "kernel": str(guest.vmlinux),
                    "initramfs": str(guest.initramfs),
                    "cmdline": tiny_cmdline(guest.cmdline, fill_and_free(fill_mb)),
                    "free_page_reporting": reporting,
                }
                task = task_config(alloc, config, task_id=f"alloc/tiny/{alloc.name}")
                task.resources.allocated_resources.memory.memory_mb = guest_mb
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=task), timeout=120)
                ids.append(task.id)
                (qemu,) = processes_under(alloc, "qemu-system")

                def run(reporting: bool = reporting, fifo: FifoReader = fifo, qemu=qemu) -> None:  # type: ignore[no-untyped-def]
                    results[reporting] = follow(
                        fifo, qemu, time.monotonic() + 300, args.settle, fill_mb
                    )

                thread = threading.Thread(target=run)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
        finally:
            for task_id in ids:
                drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task_id, force=True))
            for fifo in fifos:
                fifo.close()
            plugin.kill()
            for p in qemu_processes_under(root):
                p.kill()
    for reporting in (True, False):
        s = results[reporting]
        grown = s.filled - s.base
        back = s.filled - s.after
        label = "with free page reporting   " if reporting else "without free page reporting"
        print(f"{label}: RSS base {s.base / MIB:.0f} MiB, filled {s.filled / MIB:.0f} MiB "
              f"(+{grown / MIB:.0f}), after free {s.after / MIB:.0f} MiB "
              f"({back / MIB:.0f} MiB back, {back / grown:.0%} of the growth"
              f"{f', after {s.after_s:.1f} s' if back > 0 else ''})")  # fmt: skip
    on, off = results[True], results[False]
    print(f"ratio RSS after free, with/without: {on.after / off.after:.2f}")


if __name__ == "__main__":
    main()

"""What KSM saves: N identical guests under the driver, their VMMs' host memory with ksmd
stopped and then started by the plugin, in one run.

The plugin runs with `ksm { enabled = true, start_ksmd = false }` (guest RAM mergeable, ksmd
left stopped) while the guests boot; "off" is measured once they all run. Then the plugin is
configured again with `start_ksmd = true` and a pace, so the plugin itself starts ksmd, and
"on" is measured once KSM has settled (pages_sharing stable over consecutive full scans, with
a deadline). Memory is each QEMU's PSS (psutil, from smaps_rollup: a page KSM merged counts
once, shared among the VMs that map it) and RSS (counts it in every VM). With --virtiofs-vms,
a second plugin (share_transport = "virtiofs") runs guests whose RAM is shared with virtiofsd:
their ksm_merging_pages shows whether KSM merges them. ksmd is put back as it was.

Run: .venv/bin/python bench/ksm.py [--vms 8] [--guest tiny|debian] [--virtiofs-vms 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from google.protobuf import duration_pb2  # noqa: E402

from nomad_vm.driver.ksm import KSM_SYSFS, profit_bytes  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from tests.conftest import guest_cache, qemu_processes_under  # noqa: E402
from tests.integration.pluginkit import (  # noqa: E402
    DRIVER,
    FifoReader,
    configure,
    debian_boot,
    drv,
    task_config,
)
from tests.ksm_host import ksm_block, ksm_restored, read  # noqa: E402

MIB = 2**20
VIRTIOFSD = REPO / ".tools" / "bin" / "virtiofsd"
# ksmd's pace while measuring: fast enough to settle within minutes on a busy 2-core host.
PACE = {"pages_to_scan": 4000, "sleep_millisecs": 20}


def boot_options(kind: str) -> tuple[dict[str, object], bytes, int, list[str]]:
    """Task config, the console line that says a guest is up, guest MB, image_paths."""
    if kind == "debian":
        from nomad_vm.guests.debian import build_debian

        guest = build_debian(guest_cache())
        return debian_boot(guest), b"login:", 512, [str(guest.disk.parent)]
    from nomad_vm.guests.tiny import build_tiny

    tiny = build_tiny(guest_cache())
    config = {"kernel": str(tiny.vmlinux), "initramfs": str(tiny.initramfs),
              "cmdline": tiny.cmdline}  # fmt: skip
    return config, b"tiny guest: running", 160, [str(tiny.vmlinux.parent)]


class Fleet:
    """One plugin process and its N guests in their own allocation directory."""

    def __init__(self, root: Path, name: str, options: dict[str, object]) -> None:
        self.root = root / name
        (self.root / "alloc" / "tiny").mkdir(parents=True)
        self.fifo = FifoReader(self.root / "alloc" / "alloc" / "logs" / ".tiny.stdout.fifo")
        self.plugin = PluginProcess([str(DRIVER)])
        self.plugin.start(self.root / "plugin.stderr")
        self.options = options
        self.ids: list[str] = []

    def configure(self, image_paths: list[str], **extra: object) -> None:
        configure(self.plugin, self.root / "data", image_paths, **{**self.options, **extra})

    def start(self, n: int, config: dict[str, object], memory_mb: int) -> None:
        for i in range(n):
            task = task_config(self.root / "alloc", config, task_id=f"alloc/tiny/{i}")
            task.resources.allocated_resources.memory.memory_mb = memory_mb
            drv(self.plugin).StartTask(driver_pb2.StartTaskRequest(task=task), timeout=300)
            self.ids.append(task.id)

    def wait_up(self, marker: bytes, deadline: float) -> None:
        while self.fifo.data.count(marker) < len(self.ids):
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.fifo.data.count(marker)} guests up in time")
            time.sleep(1)

    def vmms(self) -> list[psutil.Process]:
        return qemu_processes_under(self.root)

    def close(self) -> None:
        for task_id in self.ids:
            stop = driver_pb2.StopTaskRequest(task_id=task_id,
                                              timeout=duration_pb2.Duration(seconds=0))  # fmt: skip
            drv(self.plugin).StopTask(stop)
            drv(self.plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task_id, force=True))
        self.fifo.close()
        self.plugin.kill()


def memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """Sum of PSS and of RSS of these processes."""
    infos = [p.memory_full_info() for p in procs]
    return sum(i.pss for i in infos), sum(i.rss for i in infos)


def huge_mib(procs: list[psutil.Process]) -> int:
    """Transparent huge pages the VMs hold (AnonHugePages of /proc/<pid>/smaps_rollup): KSM
    splits a huge page to merge its small pages, and the kernel may then free the split
    page's zero-filled parts, which lowers RSS besides what KSM merges."""
    total = 0
    for proc in procs:
        for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total // 1024


def merging_pages(proc: psutil.Process) -> int:
    """Pages of this process that KSM merged (Linux 6.1+: /proc/<pid>/ksm_merging_pages)."""
    try:
        return int(Path(f"/proc/{proc.pid}/ksm_merging_pages").read_text())
    except (OSError, ValueError):
        return -1


def process_profit(proc: psutil.Process) -> int:
    """What KSM saves in this process, net of its bookkeeping (/proc/<pid>/ksm_stat, 6.6+)."""
    try:
        lines = Path(f"/proc/{proc.pid}/ksm_stat").read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(maxsplit=1) for line in lines if " " in line)
    return int(fields.get("ksm_process_profit", "0"))


def wait_still(procs: list[psutil.Process], deadline: float) -> None:
    """Poll the VMs' RSS until it moves by under 1% between two polls 2 s apart."""
    last = memory(procs)[1]
    while time.monotonic() < deadline:
        time.sleep(2)
        now = memory(procs)[1]
        if abs(now - last) <= now / 100:
            return
        last = now


def wait_settled(deadline: float) -> tuple[int, float]:
    """Poll until pages_sharing changes by under 1% across two full scans; (pages, seconds)."""
    started = time.monotonic()
    scans, last = read("full_scans"), read("pages_sharing")
    while time.monotonic() < deadline:
        time.sleep(2)
        if read("full_scans") < scans + 2:
            continue
        now = read("pages_sharing")
        if now > 0 and abs(now - last) <= now / 100:
            return now, time.monotonic() - started
        scans, last = read("full_scans"), now
    print("warning: KSM did not settle before the deadline; numbers are from the deadline")
    return read("pages_sharing"), time.monotonic() - started


def fingerprint_profit(plugin: PluginProcess) -> str:
    stream = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    first = next(iter(stream))
    stream.cancel()
    attrs = first.attributes
    return (
        f"driver.vm.ksm.state={attrs['driver.vm.ksm.state'].string_val} "
        f"profit_mib={attrs['driver.vm.ksm.profit_mib'].int_val} "
        f"({attrs['driver.vm.ksm.profit_source'].string_val})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--guest", choices=("tiny", "debian"), default="tiny")
    parser.add_argument("--virtiofs-vms", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=600, help="seconds for KSM to settle")
    args = parser.parse_args()
    if not (KSM_SYSFS / "run").exists():
        print(f"ksm: this kernel has no KSM ({KSM_SYSFS} is missing): nothing to measure")
        return
    if read("run") != 0 or read("pages_sharing") != 0:
        raise SystemExit("ksmd is already running or has merged pages: 'off' cannot be measured")
    config, marker, memory_mb, image_paths = boot_options(args.guest)
    virtiofs = args.virtiofs_vms if VIRTIOFSD.exists() else 0
    host = os.uname().nodename
    print(f"ksm: {args.vms} {args.guest} guests ({memory_mb} MB each, 9p shares), "
          f"{virtiofs} with virtio-fs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
          f"on {host}, kernel {os.uname().release}, {os.cpu_count()} CPUs")  # fmt: skip
    with ksm_restored(), tempfile.TemporaryDirectory(prefix="nvm-", dir="/tmp") as tmp:
        root = Path(tmp)
        fleets: list[Fleet] = []
        try:
            private = Fleet(root, "p", {"share_transport": "9p"})
            fleets.append(private)
            private.configure(image_paths, ksm=ksm_block(start_ksmd=False))
            shared = None
            if virtiofs:
                shared = Fleet(root, "v", {"share_transport": "virtiofs",
                                           "virtiofsd_binary": str(VIRTIOFSD)})  # fmt: skip
                fleets.append(shared)
                shared.configure(image_paths, ksm=ksm_block(start_ksmd=False))
            started = time.monotonic()
            private.start(args.vms, config, memory_mb)
            if shared is not None:
                shared.start(virtiofs, config, memory_mb)
            for fleet in fleets:
                fleet.wait_up(marker, time.monotonic() + args.deadline)
            took = time.monotonic() - started
            print(f"boot: all {args.vms + virtiofs} guests up in {took:.0f} s")
            vmms = private.vmms()
            # The guests' boot-time page churn ends before "off" is measured.
            wait_still(vmms, time.monotonic() + args.deadline)
            off_pss, off_rss = memory(vmms)
            off_huge = huge_mib(vmms)
            # The same measurement again after as long as KSM will take: how much the VMs'
            # memory moves by itself (boot-time churn), to read the on/off figures against.
            time.sleep(20)
            off2_pss, off2_rss = memory(vmms)
            # The plugin itself starts ksmd, with the pace from its config.
            private.configure(image_paths, ksm=ksm_block(start_ksmd=True, **PACE))
            assert read("run") == 1, "the plugin did not start ksmd"
            sharing, took = wait_settled(time.monotonic() + args.deadline)
            on_pss, on_rss = memory(vmms)
            on_huge = huge_mib(vmms)
            profit, source = profit_bytes()
            n = len(vmms)
            print(f"KSM off: PSS {off_pss / MIB:.0f} MiB ({off_pss / n / MIB:.0f} per VM), "
                  f"RSS {off_rss / MIB:.0f} MiB; 20 s later, still off: PSS "
                  f"{off2_pss / MIB:.0f} MiB, RSS {off2_rss / MIB:.0f} MiB; transparent huge "
                  f"pages {off_huge} MiB")  # fmt: skip
            print(f"KSM on (settled after {took:.0f} s, pages_sharing {sharing}): PSS "
                  f"{on_pss / MIB:.0f} MiB ({on_pss / n / MIB:.0f} per VM), RSS "
                  f"{on_rss / MIB:.0f} MiB; transparent huge pages {on_huge} MiB")  # fmt: skip
            print(f"ratio PSS on/off: {on_pss / off_pss:.2f} (saved {(off_pss - on_pss) / MIB:.0f}"
                  f" MiB); host profit {profit / MIB:.0f} MiB ({source}); node reports: "
                  f"{fingerprint_profit(private.plugin)}")  # fmt: skip
            per_vm = [merging_pages(p) for p in vmms]
            print(f"ksm_merging_pages per private-RAM VM: {per_vm}; sum of ksm_process_profit "
                  f"{sum(process_profit(p) for p in vmms) / MIB:.0f} MiB")  # fmt: skip
            if shared is not None:
                print("ksm_merging_pages per virtio-fs VM (RAM shared with virtiofsd): "
                      f"{[merging_pages(p) for p in shared.vmms()]}")  # fmt: skip
        finally:
            for fleet in fleets:
                fleet.close()
            for p in qemu_processes_under(root):
                p.kill()


if __name__ == "__main__":
    main()

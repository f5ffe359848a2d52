"""Density: N tiny guests under the driver against N bare QEMUs with the same argv, in one run.

* Phase A, bare: N QEMU processes exec'd directly with the argv the project's own builder
  (vm/qemu/argv.py) gives the spec the driver builds for this task: the same machine, memory,
  kernel and initramfs (as descriptors, opened once), the task's three shares over 9p and a QMP
  socket; the console is QEMU's stdout, read from a file per VM.
* Phase B, driver: N StartTask calls to the real plugin, the console read from the task's
  stdout FIFO as Nomad's logmon would, then a TaskStats stream per task every second.

Both sides share over 9p (the plugin is configured so): a virtiofsd per share would be three
more processes per VM on both sides and would make the memory figures about virtiofsd. A guest
"answers" when its console prints "nomad-vm tiny guest: running" (tiny-init.sh), which both
sides observe the same way: bytes QEMU writes for the guest's serial port.

Measured per phase: time from the first start to the last answer; after --settle seconds of
running (for the driver: with the stats streams), the sum of the VMMs' PSS (psutil, from
smaps_rollup) and the drop of the host's MemAvailable from before the phase (everything the
phase costs the host, the plugin included, and anything else the host did meanwhile: this
machine may be shared, hence the load average in the header). The driver's phase also prints
the plugin's CPU (over the settle window) and RSS. Ratios are ours / bare.

The phases run one after the other, not alternated: N VMs at once is the point, and two fleets
side by side would measure each other. The driver's first QEMU command line is compared with
the bare one (descriptor numbers and paths aside), so "same argv" is checked, not assumed.
Run: .venv/bin/python bench/density.py [--vms 40] [--settle 30]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from google.protobuf import duration_pb2  # noqa: E402

from bench.many_vms import stream_stats  # noqa: E402
from bench.start_latency import bare_shares  # noqa: E402
from nomad_vm.guests.tiny import build_tiny  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from nomad_vm.storage.held import FileHolder, open_own  # noqa: E402
from nomad_vm.vm.handover import Handover  # noqa: E402
from nomad_vm.vm.qemu.argv import qemu_argv  # noqa: E402
from nomad_vm.vm.qemu.binary import find_qemu, qemu_version  # noqa: E402
from nomad_vm.vm.qemu.files_argv import inherited_fds  # noqa: E402
from nomad_vm.vm.share_transport import ShareTransport  # noqa: E402
from nomad_vm.vm.spec import VMSpec  # noqa: E402
from tests.conftest import guest_cache, qemu_processes_under  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402

MIB = 2**20
ANSWER = b"nomad-vm tiny guest: running"
POLL = 0.5  # seconds between looks for the answers, alike on both sides
NINE_P = ShareTransport("9p", None, "share_transport = 9p")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_full_info().pss for p in procs)


def accelerator(argv: list[str]) -> str:
    """The accelerator a QEMU command line asks for (-accel NAME[,...] or -machine accel=)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-accel":
            return value.split(",")[0]
        if flag in ("-machine", "-M") and "accel=" in value:
            return value.split("accel=")[1].split(",")[0]
    return "?"


def masked(argv: list[str], roots: list[Path]) -> list[str]:
    """A command line with what differs by nature between two launches of one VM masked:
    the run's directories and descriptor numbers (fd=, /dev/fdset/, add-fd ids)."""
    out = []
    for arg in argv:
        for root in roots:
            arg = arg.replace(str(root), "ROOT")
        arg = re.sub(r"(fd=|fdset/|fdset-id=|id=fdset|/proc/self/fd/)\d+", r"\1N", arg)
        out.append(arg)
    return out


class Bare:
    """N QEMUs exec'd by hand, each in its own directory, the console copied to a file."""

    def __init__(self, root: Path, guest, n: int) -> None:  # type: ignore[no-untyped-def]
        self.root = root / "bare"
        self.files = FileHolder()
        self.qemu = str(find_qemu(None))
        self.n = n
        self.guest = guest
        self.procs: list[subprocess.Popen[bytes]] = []
        self.handovers: list[Handover] = []
        self.consoles: list[int] = []

    def spec(self, i: int, accel: str) -> VMSpec:
        """What spec_build.build_spec makes of this task: the sockets bound here and handed
        over, the shared directories opened, the console copied to a file (the driver's copy
        goes to the task's stdout FIFO), QEMU's own seccomp filter on."""
        vm_dir = self.root / f"vm{i}"
        # Nomad's task directories, one allocation per VM as on the driver's side.
        for directory in ("alloc", "tiny/local", "tiny/secrets"):
            (vm_dir / "alloc" / directory).mkdir(parents=True, exist_ok=True)
        handed = Handover()
        self.handovers.append(handed)
        # driver/shares.py shares every task directory read-only (alloc/ unless the task
        # asks for it writable); start_latency's helper predates that for local/ and secrets/.
        shares = tuple(replace(s, readonly=True, host_fd=handed.directory(s.host_path))
                       for s in bare_shares(vm_dir / "alloc", vm_dir, NINE_P))  # fmt: skip
        console = os.open(vm_dir / "console", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.consoles.append(console)
        return VMSpec(
            name="tiny-a1b2c3d4",  # the driver's: task name and the allocation's first part
            vcpus=1,
            memory_mb=160,
            kernel=open_own(self.guest.vmlinux, self.files, writable=False),
            initramfs=open_own(self.guest.initramfs, self.files, writable=False),
            cmdline=self.guest.cmdline,
            accelerator=accel,
            control_socket=vm_dir / "qmp.sock",
            agent_socket=vm_dir / "agent.sock",
            shares=shares,
            share_transport="9p",
            control_fd=handed.listen(vm_dir / "qmp.sock"),
            agent_fd=handed.listen(vm_dir / "agent.sock"),
            serial_socket=vm_dir / "serial.sock",
            serial_fd=handed.listen(vm_dir / "serial.sock"),
            console_log_fd=console,
            seccomp=True,
        )

    def argv(self, i: int, accel: str) -> tuple[list[str], tuple[int, ...]]:
        spec = self.spec(i, accel)
        return qemu_argv(self.qemu, spec), inherited_fds(spec)

    def start(self, accel: str) -> float:
        """Start all N, return seconds until every console printed the answer."""
        launches = [self.argv(i, accel) for i in range(self.n)]  # descriptors opened up front
        started = time.perf_counter()
        for argv, fds in launches:
            quiet = subprocess.DEVNULL
            self.procs.append(subprocess.Popen(argv, stdin=quiet, stdout=quiet, stderr=quiet,
                                               pass_fds=fds))  # fmt: skip
        while sum(ANSWER in (self.root / f"vm{i}" / "console").read_bytes()
                  for i in range(self.n)) < self.n:  # fmt: skip
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit("a bare QEMU exited before its guest answered")
            time.sleep(POLL)
        return time.perf_counter() - started

    def vmms(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        self.files.close()
        for handed in self.handovers:
            handed.close()
        self.handovers = []
        for fd in self.consoles:
            os.close(fd)
        self.consoles = []


class Driven:
    """The real plugin and N tasks of the tiny guest, each in its own allocation (as Nomad
    places them: one task's console per stdout FIFO; 40 consoles in one FIFO interleave byte
    by byte, the UART writes one at a time), and their stats streams."""

    def __init__(self, root: Path, guest, n: int) -> None:  # type: ignore[no-untyped-def]
        self.root = root / "driver"
        self.fifos = []
        for i in range(n):
            # Nomad's task directories, which the driver shares with every VM by default.
            for directory in ("alloc", "tiny/local", "tiny/secrets"):
                (self.alloc(i) / directory).mkdir(parents=True)
            self.fifos.append(FifoReader(self.alloc(i) / "alloc" / "logs" / ".tiny.stdout.fifo"))
        self.plugin = PluginProcess([str(DRIVER)])
        self.plugin.start(self.root / "plugin.stderr")
        configure(self.plugin, self.root / "data", [str(guest.vmlinux.parent)],
                  share_transport="9p")  # fmt: skip
        self.config = {"kernel": str(guest.vmlinux), "initramfs": str(guest.initramfs),
                       "cmdline": guest.cmdline}  # fmt: skip
        self.n = n
        self.handles: list[driver_pb2.TaskHandle] = []
        self.streams: list[object] = []
        self.closed = False

    def alloc(self, i: int) -> Path:
        return self.root / f"alloc{i}"

    def start(self) -> float:
        started = time.perf_counter()
        for i in range(self.n):
            task = task_config(self.alloc(i), self.config, task_id=f"alloc{i}/tiny/{i}")
            req = driver_pb2.StartTaskRequest(task=task)
            self.handles.append(drv(self.plugin).StartTask(req, timeout=300).handle)
        while sum(ANSWER in fifo.data for fifo in self.fifos) < self.n:
            if len(self.vmms()) < self.n:
                raise SystemExit("a driver's QEMU exited before its guest answered")
            time.sleep(POLL)
        return time.perf_counter() - started

    def vmms(self) -> list[psutil.Process]:
        """The plugin's QEMU children (cheap enough to poll, unlike a scan of every process's
        descriptors, which on 2 busy cores would tax this side alone)."""
        return [p for p in self.process().children() if p.name().startswith("qemu-system")]

    def process(self) -> psutil.Process:
        assert self.plugin.process is not None
        return psutil.Process(self.plugin.process.pid)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.streams:
            s.cancel()  # type: ignore[attr-defined]
        for h in self.handles:
            with contextlib.suppress(Exception):  # stop what can be stopped, kill the rest
                now = duration_pb2.Duration(seconds=0)
                stop = driver_pb2.StopTaskRequest(task_id=h.config.id, timeout=now)
                drv(self.plugin).StopTask(stop)
                drv(self.plugin).DestroyTask(
                    driver_pb2.DestroyTaskRequest(task_id=h.config.id, force=True)
                )
        for fifo in self.fifos:
            fifo.close()
        self.plugin.kill()


def header(args: argparse.Namespace, qemu: str, accel: str) -> None:
    print(f"density: {args.vms} tiny guests (160 MB, 1 vCPU, 9p shares), settle "
          f"{args.settle:.0f} s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{os.uname().nodename} ({os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB), QEMU {qemu_version(Path(qemu))}, "
          f"accelerator {accel}; load average {load_average()}")  # fmt: skip


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: dict[str, dict[str, float]], n: int, plugin_cpu: float, plugin_rss: int) -> None:
    bare, ours = rows["bare"], rows["driver"]
    print(f"{'':28s}{'bare QEMU':>12s}{'driver':>12s}{'ours/bare':>11s}")
    for key, label, unit in (("answer", "time until all answer", "s"),
                             ("pss", "VMM PSS, sum", "MiB"),
                             ("avail", "MemAvailable drop", "MiB")):  # fmt: skip
        b, o = bare[key], ours[key]
        print(f"{label + ' (' + unit + ')':28s}{b:12.1f}{o:12.1f}{o / b:11.2f}")
    print(f"plugin with {n} tasks, stats every 1 s: CPU {plugin_cpu:.1f}% of one"
          f" core, RSS {plugin_rss / MIB:.0f} MiB")  # fmt: skip


def bare_phase(bare: Bare, accel: str, settle: float) -> dict[str, float]:
    before = mem_available()
    took = bare.start(accel)
    time.sleep(settle)
    row = {"answer": took, "pss": pss(bare.vmms()) / MIB,
           "avail": (before - mem_available()) / MIB}  # fmt: skip
    bare.close()
    return row


def driver_phase(driven: Driven, settle: float) -> tuple[dict[str, float], float, int]:
    """The row, the plugin's CPU% over the settle window (stats streaming) and its RSS."""
    before = mem_available()
    took = driven.start()
    driven.streams = stream_stats(driven.plugin, driven.handles)
    plugin = driven.process()
    plugin.cpu_percent()
    time.sleep(settle)
    cpu = plugin.cpu_percent()
    row = {"answer": took, "pss": pss(driven.vmms()) / MIB,
           "avail": (before - mem_available()) / MIB}  # fmt: skip
    rss = plugin.memory_info().rss
    driven.close()
    return row, cpu, rss


def check_argv(root: Path, bare: Bare, guest) -> str:  # type: ignore[no-untyped-def]
    """Start one driver task to learn its QEMU command line (and the accelerator the driver
    chose, which the bare side needs), compare it with the bare one, return the accelerator."""
    probe = Driven(root / "probe", guest, 1)
    try:
        probe.start()
        driver_argv = probe.vmms()[0].cmdline()
    finally:
        probe.close()
    accel = accelerator(driver_argv)
    mine = masked(driver_argv, [root / "probe" / "driver"])
    theirs = masked(bare.argv(0, accel)[0], [root / "bare"])
    if mine == theirs:
        print("argv: the driver's and the bare one are the same (paths, fds aside)")
    else:
        print(f"argv differs: driver only {sorted(set(mine) - set(theirs))}, "
              f"bare only {sorted(set(theirs) - set(mine))}")  # fmt: skip
    return accel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=40)
    parser.add_argument("--settle", type=float, default=30, help="seconds before measuring")
    parser.add_argument("--driver-first", action="store_true",
                        help="the driver's phase first (what the order costs)")  # fmt: skip
    args = parser.parse_args()
    # SIGTERM (timeout, a CI runner) unwinds like ^C, so the finally below stops every VM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # make's own tool directory first, as `make bench` has it, whatever PATH this started with.
    os.environ["PATH"] = f"{REPO / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    guest = build_tiny(guest_cache())
    with tempfile.TemporaryDirectory(prefix="nvd-", dir="/tmp") as tmp:
        root = Path(tmp)
        bare = Bare(root, guest, args.vms)
        driven: Driven | None = None
        rows: dict[str, dict[str, float]] = {}
        cpu, rss = 0.0, 0
        try:
            accel = check_argv(root, bare, guest)
            bare.close()  # the descriptors the comparison opened
            header(args, bare.qemu, accel)
            for phase in ("driver", "bare") if args.driver_first else ("bare", "driver"):
                if phase == "bare":
                    rows["bare"] = bare_phase(bare, accel, args.settle)
                else:
                    driven = Driven(root, guest, args.vms)
                    rows["driver"], cpu, rss = driver_phase(driven, args.settle)
                time.sleep(5)  # the stopped VMs' memory back to the host before the next phase
            table(rows, args.vms, cpu, rss)
            print(f"load average at the end: {load_average()}")
        finally:
            bare.close()
            if driven is not None:
                driven.close()
            for proc in qemu_processes_under(root):
                proc.kill()


if __name__ == "__main__":
    main()

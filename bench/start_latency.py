"""Start latency: StartTask until QMP answers, against bare QEMU with the same arguments.

Both sides are measured alternately in one run, so machine load affects them alike:

* driver: the StartTask RPC to a running nomad-driver-vm (validation, accelerator choice, disk
  preparation, the log FIFO, QEMU, waiting for QMP) as Nomad sends it;
* bare:   what a hand-written script would do for the same VM: bind a socket and exec a
  virtiofsd for each of the task's shares (Nomad's alloc/, local/ and secrets/), exec QEMU with
  the argv our builder produces for that task, and wait until its QMP socket answers
  query-status. Without the daemons the comparison would not be like with like.

QEMU and virtiofsd are found by the project's own lookup (with make's .tools/bin first on PATH,
whatever PATH the benchmark was started with), and the plugin is given the same virtiofsd, so
both sides use the same share transport; the header says which.

Three cases: a kernel-only VM (the tiny guest), the same with a kernel and initramfs that
only their owner may read (mode 0600: the driver hands QEMU sealed memfd copies of them, see
storage/held.py; the bare side reads them by descriptor), and a VM with a thin copy of a 10 GiB
image. Both sides give QEMU its files as descriptors (the bare side opens them once, up front).
Each case's first driver start is printed apart: the plugin's very first StartTask also loads
the driver's modules and probes KVM, QEMU and virtiofsd (once per plugin process), and the first
start of an image runs qemu-img, whose answers are remembered per image version
(storage/file_versions.py), so the later starts of the same image do not.
Run: .venv/bin/python bench/start_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nomad_vm.cloudinit import CloudInitRequest, render, write_seed  # noqa: E402
from nomad_vm.guests.tiny import build_tiny  # noqa: E402
from nomad_vm.plugin.launcher import PluginProcess  # noqa: E402
from nomad_vm.plugin.proto import driver_pb2  # noqa: E402
from nomad_vm.storage.held import FileHolder, HeldFile, open_own  # noqa: E402
from nomad_vm.vm.qemu.argv import qemu_argv  # noqa: E402
from nomad_vm.vm.qemu.binary import find_qemu  # noqa: E402
from nomad_vm.vm.qemu.files_argv import inherited_fds  # noqa: E402
from nomad_vm.vm.qemu.monitor import connect_when_ready  # noqa: E402
from nomad_vm.vm.share_transport import ShareTransport, choose_share_transport  # noqa: E402
from nomad_vm.vm.spec import DiskSpec, ShareSpec, VMSpec  # noqa: E402
from nomad_vm.vm.virtiofsd import daemon_argv  # noqa: E402
from tests.conftest import guest_cache  # noqa: E402
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config  # noqa: E402


def time_driver(plugin: PluginProcess, root: Path, config: dict[str, object], i: int) -> float:
    cfg = task_config(root / "alloc", config, task_id=f"alloc/tiny/{i}")
    started = time.perf_counter()
    drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    elapsed = time.perf_counter() - started
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    return elapsed


def time_bare(qemu: str, spec: VMSpec, virtiofsd: Path | None) -> float:
    spec.control_socket.unlink(missing_ok=True)
    argv = qemu_argv(qemu, spec)
    with contextlib.ExitStack() as cleanup:
        started = time.perf_counter()
        if virtiofsd is not None:
            for share in spec.shares:
                cleanup.enter_context(bare_daemon(virtiofsd, share))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=inherited_fds(spec),
        )
        cleanup.callback(proc.wait)
        cleanup.callback(proc.kill)

        async def ready() -> None:
            async def running() -> bool:
                return proc.poll() is None

            monitor, _ = await connect_when_ready(spec.control_socket, running, 30)
            await monitor.close()

        asyncio.run(ready())
        return time.perf_counter() - started


def bare_shares(alloc: Path, bare_dir: Path, transport: ShareTransport) -> tuple[ShareSpec, ...]:
    """The shares the driver gives the task: alloc/ (read-only by default), local/, secrets/."""
    shares = []
    for i, (tag, host, guest_path, readonly) in enumerate(
        (
            ("nomad-alloc", alloc / "alloc", "/alloc", True),
            ("nomad-local", alloc / "tiny" / "local", "/local", False),
            ("nomad-secrets", alloc / "tiny" / "secrets", "/secrets", False),
        )
    ):
        socket_path = bare_dir / f"vfs{i}.sock" if transport.name == "virtiofs" else None
        shares.append(ShareSpec(tag, host, guest_path, readonly, socket_path))
    return tuple(shares)


@contextlib.contextmanager
def bare_daemon(virtiofsd: Path, share: ShareSpec):  # type: ignore[no-untyped-def]
    """A virtiofsd on a socket bound here, the plainest way to have one ready for QEMU."""
    assert share.socket is not None
    share.socket.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(share.socket))
        listener.listen(1)
        fd = listener.fileno()
        proc = subprocess.Popen(
            daemon_argv(virtiofsd, share, fd),
            pass_fds=[fd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def run_case(
    name: str,
    runs: int,
    plugin: PluginProcess,
    root: Path,
    config: dict[str, object],
    spec: VMSpec,
    transport: ShareTransport,
) -> None:
    ours, bare = [], []
    qemu = str(find_qemu(None))
    for i in range(runs):
        ours.append(time_driver(plugin, root, config, i))
        bare.append(time_bare(qemu, spec, transport.virtiofsd))
    o, b = statistics.median(ours), statistics.median(bare)
    print(
        f"{name:28s} driver {o * 1000:7.1f} ms   bare QEMU {b * 1000:7.1f} ms   "
        f"ratio {o / b:4.2f}   overhead {(o - b) * 1000:6.1f} ms   "
        # Slower: first uses in the plugin process, qemu-img on a new image (see the top).
        f"(driver's first start: {ours[0] * 1000:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    guest = build_tiny(guest_cache())
    # make's own tool directory first, as `make bench` has it, whatever PATH this started with.
    tools = REPO / ".tools" / "bin"
    os.environ["PATH"] = f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"
    transport = choose_share_transport("auto", None)
    with tempfile.TemporaryDirectory(prefix="nvb-", dir="/tmp") as tmp:
        root = Path(tmp)
        alloc = root / "alloc"
        # Nomad's task directories, shared with every VM by default.
        for directory in (alloc / "alloc", alloc / "tiny" / "local", alloc / "tiny" / "secrets"):
            directory.mkdir(parents=True)
        image = root / "images" / "big.raw"
        image.parent.mkdir()
        subprocess.run(["truncate", "-s", "10G", str(image)], check=True)
        private = root / "private"
        private.mkdir()
        for source in (guest.vmlinux, guest.initramfs):
            shutil.copyfile(source, private / source.name)
            (private / source.name).chmod(0o600)
        plugin = PluginProcess([str(DRIVER)])
        plugin.start(root / "plugin.stderr")
        fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
        files = FileHolder()
        try:
            options = {"virtiofsd_binary": str(transport.virtiofsd)} if transport.virtiofsd else {}
            allowed = [str(guest.vmlinux.parent), str(image.parent), str(private)]
            configure(plugin, root / "data", allowed, **options)

            def held(path: Path, writable: bool = False) -> HeldFile:
                return open_own(path, files, writable=writable)

            kernel_cfg = {
                "kernel": str(guest.vmlinux),
                "initramfs": str(guest.initramfs),
                "cmdline": guest.cmdline,
            }
            bare_dir = root / "bare"
            bare_dir.mkdir()
            base = VMSpec(
                name="bench",
                vcpus=1,
                memory_mb=160,
                kernel=held(guest.vmlinux),
                initramfs=held(guest.initramfs),
                cmdline=guest.cmdline,
                accelerator="tcg",
                control_socket=bare_dir / "qmp.sock",
                agent_socket=bare_dir / "agent.sock",
                shares=bare_shares(alloc, bare_dir, transport),
                share_transport=transport.name,
            )
            overlay = bare_dir / "overlay.qcow2"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(image),
                    "-F",
                    "raw",
                    str(overlay),
                ],
                check=True,
            )
            # A VM booting an image gets a cloud-init seed from the driver; the bare side gets
            # one made beforehand (the driver's making it is part of its overhead).
            seed = write_seed(render(CloudInitRequest("bench", "bench")), bare_dir / "seed.iso")
            print(f"runs: {args.runs} per side, alternating; medians; shares: {transport.reason}")
            run_case("kernel-only VM", args.runs, plugin, root, kernel_cfg, base, transport)
            run_case(
                "kernel-only, owner-only files",
                args.runs,
                plugin,
                root,
                {
                    **kernel_cfg,
                    "kernel": str(private / guest.vmlinux.name),
                    "initramfs": str(private / guest.initramfs.name),
                },
                base,
                transport,
            )
            disk = DiskSpec(held(overlay, writable=True), "qcow2", ((held(image), "raw"),))
            disk_spec = replace(base, disk=disk, seed=held(seed))
            run_case(
                "thin copy of a 10 GiB image",
                args.runs,
                plugin,
                root,
                {**kernel_cfg, "image": str(image)},
                disk_spec,
                transport,
            )
        finally:
            files.close()
            fifo.close()
            plugin.kill()


if __name__ == "__main__":
    main()

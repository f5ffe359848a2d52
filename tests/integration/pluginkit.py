"""Helpers for driving the real plugin process like Nomad does: config encoding, a logmon
stand-in for the task's stdout FIFO, task configs for the tiny guest."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import base_pb2, base_pb2_grpc, driver_pb2, driver_pb2_grpc
from tests.conftest import REPO

DRIVER = REPO / ".venv" / "bin" / "nomad-driver-vm"
MARKER = b"nomad-vm tiny guest: booted"


def cty(obj: dict[str, object]) -> bytes:
    """go-cty encodes an object as a map with every attribute, keys in byte order."""
    return msgpack.packb(dict(sorted(obj.items())), use_bin_type=False)


def base(p: PluginProcess) -> base_pb2_grpc.BasePluginStub:
    return base_pb2_grpc.BasePluginStub(p.channel)


def drv(p: PluginProcess) -> driver_pb2_grpc.DriverStub:
    return driver_pb2_grpc.DriverStub(p.channel)


def plugin_config(data_dir: Path, image_paths: list[str], **options: object) -> bytes:
    """The config as Nomad sends it: every attribute of the schema, unset ones as null."""
    return cty(
        {
            "accelerator": "auto",
            "data_dir": str(data_dir),
            "image_paths": image_paths,
            "qemu_binary": None,
            "share_transport": None,
            "virtiofsd_binary": None,
            **options,
        }
    )


class FifoReader:
    """Plays Nomad's logmon: creates the task's stdout FIFO and keeps reading it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.data = bytearray()
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                chunk = os.read(self._fd, 65536)
                if chunk:
                    self.data += chunk
                else:
                    time.sleep(0.05)

    def drained(self) -> bool:
        """Nothing is waiting in the FIFO: what was written to it is in ``data`` (or being
        appended by the reading thread's current pass)."""
        pending = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(pending, "little") == 0

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.data:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        os.close(self._fd)


def debian_boot(guest) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Task options booting the Debian test guest (its disk, with its kernel and initrd given
    directly: faster than the boot loader under TCG)."""
    return {
        "image": str(guest.disk),
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initrd),
        "cmdline": guest.cmdline,
    }


def task_config(
    alloc_dir: Path, driver_config: dict[str, object], task_id: str = ""
) -> driver_pb2.TaskConfig:
    return driver_pb2.TaskConfig(
        id=task_id or "a1b2c3d4-0000-0000-0000-000000000001/tiny/abcd1234",
        name="tiny",
        alloc_id="a1b2c3d4-0000-0000-0000-000000000001",
        alloc_dir=str(alloc_dir),
        stdout_path=str(alloc_dir / "alloc" / "logs" / ".tiny.stdout.fifo"),
        stderr_path=str(alloc_dir / "alloc" / "logs" / ".tiny.stderr.fifo"),
        msgpack_driver_config=cty(driver_config),
        resources=driver_pb2.Resources(
            allocated_resources=driver_pb2.AllocatedTaskResources(
                cpu=driver_pb2.AllocatedCpuResources(cpu_shares=500),
                memory=driver_pb2.AllocatedMemoryResources(memory_mb=160),
            ),
        ),
    )


def configure(
    plugin: PluginProcess, data_dir: Path, image_paths: list[str], **options: object
) -> None:
    base(plugin).SetConfig(
        base_pb2.SetConfigRequest(
            msgpack_config=plugin_config(data_dir, image_paths, **options),
            nomad_config=base_pb2.NomadConfig(driver=base_pb2.NomadDriverConfig()),
        )
    )


@contextlib.contextmanager
def tiny_task(
    plugin: PluginProcess,
    root: Path,
    guest,  # type: ignore[no-untyped-def]
    *,
    alloc_name: str,
    run: str | None = None,
    overrides: dict[str, object] | None = None,
    image_paths: list[str] | None = None,
    plugin_options: dict[str, object] | None = None,
) -> Iterator[tuple[driver_pb2.TaskConfig, FifoReader, Path]]:
    """Configure the plugin (with ``plugin_options`` as extra top-level options), lay out an
    alloc dir with a reading stdout FIFO, build the config."""
    from nomad_vm.guests.tiny import tiny_cmdline

    configure(
        plugin, root / "data", image_paths or [str(guest.vmlinux.parent)], **(plugin_options or {})
    )
    alloc = root / alloc_name
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    driver_config: dict[str, object] = {
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initramfs),
        "cmdline": tiny_cmdline(guest.cmdline, run) if run else guest.cmdline,
        **(overrides or {}),
    }
    try:
        task_id = f"a1b2c3d4-0000-0000-0000-000000000001/tiny/{alloc_name}"
        yield task_config(alloc, driver_config, task_id), fifo, alloc
    finally:
        fifo.close()

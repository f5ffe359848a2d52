"""Helpers for the image-by-URL tests through the driver: a node (VMDriver with the fake
backend, whose VMM is a real process; the journal and its replay are real; real qemu-img),
its tasks, and what a task may have left behind."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.runtime_dir import runtime_dir
from nomad_vm.driver.types import TaskConfig
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.registry import HypervisorRegistry
from tests.conformance.kits import tiny_task_config
from tests.fakes import hypervisor as fake
from tests.image_server import ImageServer, image_server

ALLOC = "c0ffee00-0000-0000-0000-000000000001"


class DiskBlocks(fake.FakeHypervisor):
    """The fake, declaring `disk {}` blocks as QEMU does (pool disks need them)."""

    capabilities = replace(fake.CAPABILITIES, disk_blocks=True)


def qcow2_bytes(tmp: Path, size: str = "64M") -> bytes:
    path = tmp / f"made-{size}.qcow2"
    subprocess.run(
        [str(find_qemu_img()), "create", "-q", "-f", "qcow2", str(path), size], check=True
    )
    return path.read_bytes()


class Node:
    def __init__(
        self, root: Path, guest: Any, extra: dict[str, object] | None = None, **cache: object
    ) -> None:
        self.root = root
        self.guest = guest
        self.extra = extra or {}
        self.host = fake.FakeHost()
        self.cache = {"max_unused_age": "1h", "read_timeout": 3, "connect_timeout": 3, **cache}
        self.store = ImageStore(root / "data")

    def driver(self) -> VMDriver:
        host = self.host
        registry = HypervisorRegistry({fake.NAME: lambda: DiskBlocks(host)}, default=fake.NAME)
        driver = VMDriver(backends=registry)
        config = {
            "data_dir": str(self.root / "data"),
            "image_paths": [str(self.guest.vmlinux.parent)],
            "image_cache": self.cache,
            **self.extra,
        }
        driver.set_config(config, None)
        return driver

    def task(self, name: str, **options: object) -> TaskConfig:
        config: dict[str, object] = {
            "kernel": str(self.guest.vmlinux),
            "initramfs": str(self.guest.initramfs),
            "cmdline": self.guest.cmdline,
            "cloud_init": False,
            **options,
        }
        # Each task its own allocation, as Nomad would have it (one start of a task per
        # allocation at a time: the driver takes another start of the same task as superseding).
        alloc_id = str(uuid.uuid5(uuid.UUID(ALLOC), name))
        return tiny_task_config(self.root / name, alloc_id, name, config)

    def runtime(self, task: TaskConfig) -> Path:
        """Where the driver keeps the task's runtime dir: in its task dir, or under data_dir
        when the path would be too long for sockets (pytest's tmp_path under xdist)."""
        return runtime_dir(task, self.root / "data")

    def leftovers(self, task: TaskConfig) -> list[Path]:
        """Whatever the task's start left: runtime dirs, its journal, leases, partial files."""
        found = list((Path(task.alloc_dir) / "tiny").glob("nomad-vm-*"))
        found += list((self.root / "data").glob("run/*"))
        found += list((self.root / "data").glob("journal/*"))
        found += list(self.store.root.glob("leases/*/*"))
        found += list(self.store.root.glob("partial/*"))
        return found


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 300))


@pytest.fixture
def server() -> Any:
    with image_server() as s:
        yield s


def url_of(server: ImageServer, path: str, sha: str) -> dict[str, object]:
    return {"image": server.url(path), "image_checksum": f"sha256:{sha}"}

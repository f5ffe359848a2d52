"""The descriptors of a task's files (storage/held.py) live only as long as its start: the
plugin, which serves many tasks, keeps none once StartTask has answered, and each QEMU holds
descriptors of its own task's files only (issue 10, least privilege).

Through the real plugin process and QEMU under TCG, two tasks at once: one boots a kernel that
only its owner may read (QEMU gets a sealed memfd copy), the other a thin copy of a qcow2 on a
raw base with a cloud-init seed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under
from tests.integration.pluginkit import drv, tiny_task

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def open_files(pid: int) -> set[str]:
    """What the descriptors of process ``pid`` name (files, memfds, sockets ...)."""
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            names.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return names


def qemu_of(alloc: Path) -> psutil.Process:
    found = processes_under(alloc, "qemu-system")
    assert len(found) == 1, found
    return found[0]


def test_the_plugin_keeps_no_descriptor_and_each_qemu_only_its_own(
    plugin: PluginProcess, tiny_guest: Any, short_tmp: Path
) -> None:
    assert plugin.process is not None
    images = short_tmp / "images"
    images.mkdir()
    kernel = images / "vmlinux"
    shutil.copyfile(tiny_guest.vmlinux, kernel)
    kernel.chmod(0o600)
    base = images / "base.raw"
    base.write_bytes(b"\0" * MIB)
    top = images / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)],
        check=True,
    )
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    before = open_files(plugin.process.pid)
    with contextlib.ExitStack() as stack:
        kernel_task, kernel_console, kernel_alloc = stack.enter_context(
            tiny_task(
                plugin,
                short_tmp,
                tiny_guest,
                alloc_name="fa",
                overrides={"kernel": str(kernel), "share_task_dirs": False},
                image_paths=paths,
            )
        )
        disk_task, _, disk_alloc = stack.enter_context(
            tiny_task(
                plugin,
                short_tmp,
                tiny_guest,
                alloc_name="fb",
                overrides={"image": str(top), "share_task_dirs": False},
                image_paths=paths,
            )
        )
        started = []
        try:
            for cfg in (kernel_task, disk_task):
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
                started.append(cfg)
            assert kernel_console.wait_for(b"nomad-vm tiny guest: booted", 120)

            # The plugin holds nothing of either task's files.
            held = open_files(plugin.process.pid)
            task_files = {str(kernel), str(base), str(top), str(tiny_guest.initramfs)}
            for alloc in (kernel_alloc, disk_alloc):
                task_files |= {str(p) for p in alloc.rglob("*") if p.is_file()}
            assert not held & task_files, held & task_files
            assert not [name for name in held if name.startswith("/memfd:")], held

            # Each QEMU holds its own task's files and none of the other's.
            kernel_qemu = open_files(qemu_of(kernel_alloc).pid)
            disk_qemu = open_files(qemu_of(disk_alloc).pid)
            disk_files = {str(base), str(top)}
            assert disk_files <= disk_qemu, disk_qemu
            assert any(name.endswith("/disk.qcow2") for name in disk_qemu), disk_qemu
            assert any(name.endswith("/cidata.iso") for name in disk_qemu), disk_qemu
            assert not kernel_qemu & disk_files, kernel_qemu
            assert not [name for name in kernel_qemu if str(disk_alloc) in name], kernel_qemu
            assert str(kernel) not in disk_qemu
        finally:
            for cfg in started:
                drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    # Nothing opened for the two starts is left: the plugin's open files are what they were.
    after = open_files(plugin.process.pid)
    assert files_only(after) <= files_only(before), files_only(after) - files_only(before)
    assert not [name for name in after if name.startswith("/memfd:")], after


def files_only(names: set[str]) -> set[str]:
    """Paths (not sockets, pipes, eventfds: the gRPC server and event loop come and go)."""
    return {name for name in names if name.startswith("/")}

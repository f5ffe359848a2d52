"""A file a job names is opened once by the plugin and handed to QEMU as a descriptor, so
replacing its path after validation changes nothing (issue 10, least privilege).

Through the real plugin process and QEMU under TCG: StartTask is paused by the test hook at
``vmm-recorded`` (everything is validated and prepared, QEMU is forked at its gate and has not
run yet), the validated kernel (or, separately, the disk image) is replaced by a symlink to a
secret file outside the allowed directories, and the start resumes. The VM must boot the
validated file, and nothing may open the secret (inotify watches it from before the swap).
On code that lets QEMU open the job's files by name, QEMU opens the secret instead.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from nomad_vm.driver.checkpoints import PAUSE_AT, PAUSE_MARKER, RESUME_FIFO
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import wait_until
from tests.integration.pluginkit import DRIVER, drv, tiny_task

pytestmark = pytest.mark.integration

SWAP_STEP = "vmm-recorded"
SECRET = b"root:TOP-SECRET-SHADOW-LINE:19000:0:99999:7:::\n"
VALIDATED = b"VALIDATED-DISK-CONTENT-0123"
MIB = 1024 * 1024


class PausedPlugin:
    """The plugin with its StartTask paused at ``SWAP_STEP`` until ``resume``."""

    def __init__(self, root: Path) -> None:
        self.marker = root / "paused"
        self.fifo = root / "resume"
        os.mkfifo(self.fifo)
        env = {PAUSE_AT: SWAP_STEP, PAUSE_MARKER: str(self.marker), RESUME_FIFO: str(self.fifo)}
        self.process = PluginProcess([str(DRIVER)], env)
        self.process.start(root / "plugin.stderr")

    def resume(self) -> None:
        # Opening for writing meets the plugin's blocked reader; closing ends its read.
        with open(self.fifo, "wb"):
            pass


@pytest.fixture
def paused(short_tmp: Path) -> Iterator[PausedPlugin]:
    plugin = PausedPlugin(short_tmp)
    yield plugin
    plugin.process.kill()


@pytest.fixture
def secret(short_tmp: Path) -> Path:
    """A file no job may name (outside image_paths and every allocation dir)."""
    path = short_tmp / "elsewhere" / "shadow"
    path.parent.mkdir()
    path.write_bytes(SECRET.ljust(MIB, b"\0"))
    path.chmod(0o600)
    return path


def swap_for_symlink(path: Path, target: Path) -> None:
    """Atomically replace ``path`` by a symlink to ``target`` (what an attacker who can write
    the allowed directory does between the plugin's check and QEMU's open)."""
    link = path.with_name(path.name + ".swap")
    link.symlink_to(target)
    os.replace(link, path)


def start_swapped(
    paused: PausedPlugin, cfg: driver_pb2.TaskConfig, swapped: Path, secret: Path
) -> INotify:
    """StartTask until the pause, swap ``swapped`` for a link to ``secret``, resume; returns
    the inotify watch on the secret (set before the swap)."""
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(drv(paused.process).StartTask(driver_pb2.StartTaskRequest(task=cfg)))
        except grpc.RpcError as exc:
            outcome.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    assert wait_until(paused.marker.exists, 120), outcome
    opens = INotify()
    opens.add_watch(secret, inotify_flags.OPEN | inotify_flags.ACCESS)
    swap_for_symlink(swapped, secret)
    paused.resume()
    starter.join(120)
    assert outcome and isinstance(outcome[0], driver_pb2.StartTaskResponse), outcome
    return opens


def destroy(paused: PausedPlugin, cfg: driver_pb2.TaskConfig) -> None:
    drv(paused.process).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))


def test_a_kernel_swapped_for_a_symlink_after_validation_still_boots_the_validated_kernel(
    paused: PausedPlugin, tiny_guest: Any, short_tmp: Path, secret: Path
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    kernel, initramfs = images / "vmlinux", images / "initramfs.img"
    shutil.copyfile(tiny_guest.vmlinux, kernel)
    shutil.copyfile(tiny_guest.initramfs, initramfs)
    # Readable by its owner only: QEMU gets a sealed copy (storage/held.py readable_copy).
    kernel.chmod(0o600)
    overrides = {"kernel": str(kernel), "initramfs": str(initramfs), "share_task_dirs": False}
    with tiny_task(
        paused.process,
        short_tmp,
        tiny_guest,
        alloc_name="kswap",
        overrides=overrides,
        image_paths=[str(images)],
    ) as (cfg, console, _):
        opens = start_swapped(paused, cfg, kernel, secret)
        try:
            assert console.wait_for(b"nomad-vm tiny guest: booted", 120), console.data[-2000:]
            assert opens.read(timeout=0) == [], "the secret was opened"
        finally:
            destroy(paused, cfg)
    assert kernel.is_symlink()  # the swap really happened


def test_a_disk_image_swapped_for_a_symlink_after_validation_is_not_what_the_vm_reads(
    paused: PausedPlugin, tiny_guest: Any, short_tmp: Path, secret: Path
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    image = images / "data.raw"
    image.write_bytes(VALIDATED.ljust(MIB, b"\0"))
    overrides = {"image": str(image), "cloud_init": False, "share_task_dirs": False}
    run = f"echo disk-says: $(head -c {len(VALIDATED)} /dev/vda)"
    with tiny_task(
        paused.process,
        short_tmp,
        tiny_guest,
        alloc_name="dswap",
        run=run,
        overrides=overrides,
        image_paths=[str(tiny_guest.vmlinux.parent), str(images)],
    ) as (cfg, console, _):
        opens = start_swapped(paused, cfg, image, secret)
        try:
            assert console.wait_for(b"disk-says: ", 120), console.data[-2000:]
            assert console.wait_for(b"disk-says: " + VALIDATED, 10), console.data[-2000:]
            assert b"TOP-SECRET" not in bytes(console.data)
            assert opens.read(timeout=0) == [], "the secret was opened"
        finally:
            destroy(paused, cfg)
    assert image.is_symlink()

"""One image, many tasks, through the driver (``url_node``) and a real HTTP server on
loopback: ten concurrent tasks download once (counted on the server), two plugins sharing a
data_dir download once (the per-image lock), and a wrong URL for a digest fails only the task
that gave it."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.errors import ImageError
from nomad_vm.storage.tools import find_qemu_img
from tests.image_server import ImageServer
from tests.integration.url_node import Node, qcow2_bytes, run, server, url_of

__all__ = ["server"]  # the fixture, used by name


def test_ten_concurrent_tasks_share_one_download(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    sha = server.add("/base.qcow2", qcow2_bytes(tmp_path))
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        tasks = [node.task(f"t{i}", **url_of(server, "/base.qcow2", sha)) for i in range(10)]
        await asyncio.gather(*(driver.start_task(t) for t in tasks))
        assert driver.images.downloads == 1
        [entry] = node.store.entries()
        assert entry.sha256 == sha and entry.complete
        assert sorted(entry.users) == sorted(t.id for t in tasks)
        for t in tasks:
            disk = node.runtime(t) / "disk.qcow2"
            info = subprocess.run(
                [str(find_qemu_img()), "info", "-U", "--output=json", str(disk)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert '"backing-filename"' in info  # a thin overlay on the cached image
        for t in tasks:
            await driver.destroy_task(t.id, force=True)
        [entry] = node.store.entries()
        assert entry.users == ()
        for t in tasks:
            assert node.leftovers(t) == []
        await driver.shutdown()

    run(scenario())
    # Counted on the server: one request for the whole file.
    assert len(server.gets("/base.qcow2")) == 1


def waiting_on(lock: Path) -> bool:
    """Is some process blocked on ``lock``'s flock? (/proc/locks lists waiters with "->".)"""
    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as f:
        return any("-> FLOCK" in line and f":{inode} " in line for line in f)


def test_two_plugins_sharing_a_data_dir_download_once(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    """Two drivers (as two plugin processes configured with one data_dir) start tasks with the
    same image while the first download is held by the server: the second waits on the
    image's download lock instead of fetching it again, then uses what the first fetched."""
    sha = server.add("/shared.img", b"\5" * (2 * 1024 * 1024))
    pace = threading.Event()
    server.behaviour.pace = pace
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        first, second = node.driver(), node.driver()
        a = node.task("a", **url_of(server, "/shared.img", sha))
        b = node.task("b", **url_of(server, "/shared.img", sha))
        started_a = asyncio.ensure_future(first.start_task(a))
        assert await asyncio.to_thread(server.arrived.wait, 30)
        started_b = asyncio.ensure_future(second.start_task(b))
        lock = node.store.download_lock(sha)
        deadline = time.monotonic() + 30
        while not waiting_on(lock):
            assert time.monotonic() < deadline, "the second download never waited on the lock"
            await asyncio.sleep(0.05)  # polling an observable state, not a timed guess
        pace.set()
        await asyncio.gather(started_a, started_b)
        assert sorted(node.store.entries()[0].users) == sorted([a.id, b.id])
        await first.destroy_task(a.id, force=True)
        await second.destroy_task(b.id, force=True)
        assert not lock.exists()
        await first.shutdown()
        await second.shutdown()

    run(scenario())
    assert len(server.gets("/shared.img")) == 1


def test_a_wrong_url_for_a_digest_fails_only_its_own_task(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    """Two tasks name one image (one sha256) by different URLs; the first URL serves other
    bytes. The task that gave it fails naming its checksum; the other, which was waiting for
    that download, fetches from its own URL and starts."""
    sha = server.add("/good.raw", b"\7" * (1024 * 1024))
    server.add("/evil.raw", b"\x08" * (1024 * 1024))
    pace = threading.Event()
    server.behaviour.pace = pace
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        evil = node.task("evil", **url_of(server, "/evil.raw", sha))
        good = node.task("good", **url_of(server, "/good.raw", sha))
        joined = asyncio.Event()

        async def watch() -> None:
            async for event in driver.task_events():
                if event.task_id == good.id and event.message.startswith("Downloading image"):
                    joined.set()  # emitted right before it joins the download under way

        watcher = asyncio.ensure_future(watch())
        started_evil = asyncio.ensure_future(driver.start_task(evil))
        assert await asyncio.to_thread(server.arrived.wait, 30)
        started_good = asyncio.ensure_future(driver.start_task(good))
        await asyncio.wait_for(joined.wait(), 60)
        pace.set()
        with pytest.raises(ImageError, match=r"^config\.image_checksum: "):
            await started_evil
        await started_good
        [entry] = node.store.entries()
        assert entry.users == (good.id,)
        await driver.destroy_task(good.id, force=True)
        watcher.cancel()
        await driver.shutdown()

    run(scenario())
    assert len(server.gets("/evil.raw")) == 1 and len(server.gets("/good.raw")) == 1

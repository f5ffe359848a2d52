"""Images given by URL through the driver (``url_node``) and a real HTTP server on
loopback: a checksum mismatch, a 404 or a stalled server leaving nothing behind, bad URLs
naming the option, progress events, leases held while a task runs (also across a plugin
restart), removal of unused images only, resuming, pool disks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import nomad_vm.driver.image_fetch as image_fetch
from nomad_vm.errors import ConfigError, ImageError
from tests.image_server import ImageServer
from tests.integration.url_node import Node, qcow2_bytes, run, server, url_of

__all__ = ["server"]  # the fixture, used by name


def test_a_checksum_mismatch_names_the_option_and_leaves_nothing(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    server.add("/base.qcow2", qcow2_bytes(tmp_path))
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        task = node.task("bad", **url_of(server, "/base.qcow2", "ab" * 32))
        with pytest.raises(ImageError, match=r"^config\.image_checksum: .*sha256 is"):
            await driver.start_task(task)
        assert node.leftovers(task) == []
        assert node.store.entries() == []
        assert node.host.launches == 0
        await driver.shutdown()

    run(scenario())


def test_a_404_names_the_image_option_and_a_disk_source_its_own(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        task = node.task("gone", **url_of(server, "/gone.qcow2", "ab" * 32))
        with pytest.raises(ImageError, match=r"^config\.image: .*404"):
            await driver.start_task(task)
        assert node.leftovers(task) == []
        disk = {
            "size": "80MiB",
            "source": {"image": server.url("/gone.raw"), "checksum": "sha256:" + "cd" * 32},
        }
        task = node.task("gone2", disk=[disk])
        with pytest.raises(ImageError, match=r"^config\.disk\[0\]\.source\.image: .*404"):
            await driver.start_task(task)
        assert node.leftovers(task) == []
        await driver.shutdown()

    run(scenario())


def test_bad_urls_and_schemes_name_the_option(tmp_path: Path, tiny_guest: Any) -> None:
    node = Node(tmp_path, tiny_guest, allowed_schemes=["https"])
    sha = "sha256:" + "ab" * 32
    cases = [
        ({"image": "http://127.0.0.1/x.img", "image_checksum": sha}, r"config\.image: http://"),
        ({"image": "ftp://127.0.0.1/x.img", "image_checksum": sha}, r"config\.image: ftp://"),
        ({"image": "https:///x.img", "image_checksum": sha}, r"config\.image: .*no host"),
        ({"image": "https://127.0.0.1/x.img"}, r"config\.image_checksum: .*needs its checksum"),
        (
            {"image": "https://127.0.0.1/x.img", "image_checksum": "md5:" + "a" * 32},
            r"config\.image_checksum: 'md5'",
        ),
        (
            {"image": "https://127.0.0.1/x.img?checksum=sha256:" + "1" * 64, "image_checksum": sha},
            r"config\.image_checksum: differs",
        ),
        ({"image": "local/x.img", "image_checksum": sha}, r"config\.image_checksum: is only"),
        (
            {"disk": [{"source": {"image": "htps://127.0.0.1/x", "checksum": sha}}]},
            r"config\.disk\[0\]\.source\.image: htps://",
        ),
    ]

    async def scenario() -> None:
        driver = node.driver()
        for i, (options, pattern) in enumerate(cases):
            task = node.task(f"u{i}", **options)
            with pytest.raises(ConfigError, match=pattern):
                await driver.start_task(task)
            assert node.leftovers(task) == []
        await driver.shutdown()

    run(scenario())


def test_progress_events_while_downloading(
    tmp_path: Path, tiny_guest: Any, server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk is worth an event here (the period is a test knob); the text is the
    operator's: "Downloading image: 45% of 64 MiB"."""
    monkeypatch.setattr(image_fetch, "PROGRESS_PERIOD", 0.0)
    sha = server.add("/raw.img", b"\1" * (4 * 1024 * 1024))
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> list[str]:
        driver = node.driver()
        seen: list[str] = []

        async def collect() -> None:
            async for event in driver.task_events():
                seen.append(event.message)

        collector = asyncio.ensure_future(collect())
        task = node.task("p", **url_of(server, "/raw.img", sha))
        await driver.start_task(task)
        await driver.destroy_task(task.id, force=True)
        collector.cancel()
        await driver.shutdown()
        return seen

    seen = run(scenario())
    progress = [m for m in seen if m.startswith("Downloading image: ")]
    assert progress and progress[-1] == "Downloading image: 100% of 4 MiB", seen
    assert any(m.startswith("Image downloaded: http://127.0.0.1:") for m in seen), seen


def test_gc_removes_only_images_no_task_uses(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    data = qcow2_bytes(tmp_path)
    used = server.add("/used.qcow2", data)
    unused = server.add("/unused.raw", b"\2" * (2 * 1024 * 1024))
    node = Node(tmp_path, tiny_guest, max_unused_age="0s", max_size="1MiB")

    async def scenario() -> None:
        driver = node.driver()
        runs = node.task("runs", **url_of(server, "/used.qcow2", used))
        done = node.task("done", **url_of(server, "/unused.raw", unused))
        await driver.start_task(runs)
        await driver.start_task(done)
        await driver.destroy_task(done.id, force=True)
        # Age 0s and a cache far over 1 MiB: everything unused goes, the image in use stays.
        await driver.images.gc()
        assert [e.sha256 for e in node.store.entries()] == [used]
        # A plugin restart: the recovered task holds its image again.
        handle = driver._tasks[runs.id].journal.encode()
        await driver.shutdown()
        again = node.driver()
        from nomad_vm.driver.types import TaskHandle, TaskState

        await again.recover_task(runs, TaskHandle(1, TaskState.RUNNING, handle))
        await again.images.gc()
        assert [e.users for e in node.store.entries()] == [(runs.id,)]
        await again.destroy_task(runs.id, force=True)
        await again.images.gc()
        assert node.store.entries() == []
        assert node.leftovers(runs) == []
        await again.shutdown()

    run(scenario())


def test_the_cached_image_is_the_plugin_own_state(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    """A task cannot name a cached image by its path: the cache lies in data_dir."""
    sha = server.add("/raw.img", b"\3" * (1024 * 1024))
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        first = node.task("owner", **url_of(server, "/raw.img", sha))
        await driver.start_task(first)
        blob = node.store.blob(sha)
        assert blob.exists()
        thief = node.task("thief", image=str(blob))
        with pytest.raises(ImageError, match=r"config\.image: .*(outside|own state)"):
            await driver.start_task(thief)
        await driver.destroy_task(first.id, force=True)
        await driver.shutdown()

    run(scenario())


def test_a_stalled_server_fails_the_start_in_bounded_time(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    sha = server.add("/raw.img", b"\4" * (1024 * 1024))
    server.behaviour.stall = True
    node = Node(tmp_path, tiny_guest, read_timeout=2)

    async def scenario() -> None:
        driver = node.driver()
        task = node.task("stall", **url_of(server, "/raw.img", sha))
        started = time.monotonic()
        with pytest.raises(ImageError, match=r"config\.image: .*read_timeout"):
            await driver.start_task(task)
        assert time.monotonic() - started < 10
        assert server.stalled.is_set()
        # The lease is released; the (empty) partial download stays for a resume, and the
        # removal policy takes it once it is old.
        assert list(node.store.root.glob("leases/*/*")) == []
        assert not node.runtime(task).exists()
        await driver.shutdown()

    run(scenario())


def test_an_interrupted_download_is_resumed_by_the_next_start(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    """The first start fails with the download broken off again and again (its partial file
    stays in the cache, its lease does not); the next start asks only for the rest (Range) and
    the image it gets verifies."""
    data = qcow2_bytes(tmp_path, "256M") + b"\0" * (3 * 1024 * 1024)
    sha = server.add("/big.img", data)
    server.behaviour.break_after = 256 * 1024
    server.behaviour.breaks_left = 1000
    node = Node(tmp_path, tiny_guest)

    async def scenario() -> None:
        driver = node.driver()
        first = node.task("first", **url_of(server, "/big.img", sha))
        with pytest.raises(ImageError, match=r"config\.image: .*broke off"):
            await driver.start_task(first)
        # Only the cache's partial download (and its validator for If-Range) remain.
        partial = node.store.partial(sha)
        assert sorted(node.leftovers(first)) == [partial, Path(f"{partial}.json")]
        kept = node.store.partial(sha).stat().st_size
        assert 0 < kept < len(data)
        server.behaviour.breaks_left = 0
        second = node.task("second", **url_of(server, "/big.img", sha))
        await driver.start_task(second)
        assert server.gets("/big.img")[-1].range == f"bytes={kept}-"
        [entry] = node.store.entries()
        assert entry.complete and entry.size == len(data)
        await driver.destroy_task(second.id, force=True)
        assert node.leftovers(second) == []
        await driver.shutdown()

    run(scenario())


def test_a_pool_disk_from_a_url_imports_the_cached_image_once(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    sha = server.add("/pooled.qcow2", qcow2_bytes(tmp_path))
    pool = tmp_path / "pool"
    pools = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    node = Node(tmp_path, tiny_guest, extra=pools)
    disk = {
        "pool": "local",
        "chained": True,
        "size": "80MiB",
        "source": {"image": server.url("/pooled.qcow2"), "checksum": f"sha256:{sha}"},
    }

    async def scenario() -> None:
        driver = node.driver()
        tasks = [node.task(f"p{i}", disk=[disk]) for i in range(2)]
        for t in tasks:
            await driver.start_task(t)
        # The image is imported into the pool once (a volume both overlays sit on).
        assert len([p for p in pool.iterdir() if not p.name.startswith(".")]) == 1
        for t in tasks:
            await driver.destroy_task(t.id, force=True)
        for t in tasks:
            assert node.leftovers(t) == []
        await driver.shutdown()

    run(scenario())
    assert len(server.gets("/pooled.qcow2")) == 1


def test_without_checksums_when_allowed_the_first_download_of_a_url_is_reused(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    sha = server.add("/trusted.raw", b"\6" * (1024 * 1024))
    node = Node(tmp_path, tiny_guest, checksum_required=False)

    async def scenario() -> None:
        driver = node.driver()
        tasks = [node.task(f"n{i}", image=server.url("/trusted.raw")) for i in range(2)]
        for t in tasks:
            await driver.start_task(t)
        [entry] = node.store.entries()
        assert entry.key.startswith("url-") and entry.sha256 == sha
        for t in tasks:
            await driver.destroy_task(t.id, force=True)
        await driver.shutdown()

    run(scenario())
    assert len(server.gets("/trusted.raw")) == 1

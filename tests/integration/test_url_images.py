"""Images given by URL through the driver (VMDriver with the fake backend: its VMM is a real
process, the journal and its replay are real), real qemu-img, and a real HTTP server on
loopback: one download for ten concurrent tasks, a checksum mismatch or a 404 leaving
nothing behind, leases held while a task runs (also across a plugin restart), and removal of
unused images only."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import nomad_vm.driver.image_fetch as image_fetch
from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.registry import HypervisorRegistry
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
        alloc = self.root / name
        for sub in ("alloc/logs", "tiny/local", "tiny/secrets"):
            (alloc / sub).mkdir(parents=True, exist_ok=True)
        console = alloc / "alloc" / "logs" / "tiny.stdout"
        console.touch()
        config: dict[str, object] = {
            "kernel": str(self.guest.vmlinux),
            "initramfs": str(self.guest.initramfs),
            "cmdline": self.guest.cmdline,
            "cloud_init": False,
            **options,
        }
        return TaskConfig(
            id=f"{ALLOC}/tiny/{name}",
            name="tiny",
            alloc_id=ALLOC,
            alloc_dir=str(alloc),
            stdout_path=str(console),
            stderr_path="",
            resources=TaskResources(cpu_mhz=500, memory_mb=160),
            driver_config=config,
        )

    def leftovers(self, task: TaskConfig) -> list[Path]:
        """Whatever the task's start left: runtime dirs, its journal, leases, partial files."""
        found = list((Path(task.alloc_dir) / "tiny").glob("nomad-vm-*"))
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
            disk = next((Path(t.alloc_dir) / "tiny").glob("nomad-vm-*/disk.qcow2"))
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
        assert list((Path(task.alloc_dir) / "tiny").glob("nomad-vm-*")) == []
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
    import threading

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


def test_a_wrong_url_for_a_digest_fails_only_its_own_task(
    tmp_path: Path, tiny_guest: Any, server: ImageServer
) -> None:
    """Two tasks name one image (one sha256) by different URLs; the first URL serves other
    bytes. The task that gave it fails naming its checksum; the other, which was waiting for
    that download, fetches from its own URL and starts."""
    import threading

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

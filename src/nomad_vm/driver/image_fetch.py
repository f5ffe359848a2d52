"""Images by URL, one download per image for the whole plugin: tasks that want an image being
downloaded wait for that download (and hear its progress) instead of starting their own.

Each download runs as its own asyncio task, shielded from the StartTask that began it: a
start that is cancelled leaves the download to the others waiting (and to the cache: the
next start resumes it). The removal policy runs here too, after each download, after each
lease is released, and every `image_cache.gc_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nomad_vm.storage.cache_policy import CachePolicy
from nomad_vm.storage.download import DownloadError, Limits, download
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.storage.image_url import ImageURL

log = logging.getLogger(__name__)

# A task event at most this often per waiting task ("every few seconds").
PROGRESS_PERIOD = 3.0
GIB = 1024**3
MIB = 1024**2

# What a waiting task is told: (bytes so far, total or None).
Listener = Callable[[int, int | None], None]


@dataclass
class _Flight:
    task: asyncio.Task[Path]
    url: str
    listeners: list[Listener] = field(default_factory=list)
    last_told: float = 0.0


class ImageFetcher:
    def __init__(self, store: ImageStore, policy: CachePolicy) -> None:
        self.store = store
        self.policy = policy
        self._flights: dict[str, _Flight] = {}
        self._gc_task: asyncio.Task[None] | None = None
        # How many downloads this plugin started (tests and logs).
        self.downloads = 0

    async def ensure(self, image: ImageURL, key: str, listener: Listener) -> Path:
        """The cached image ``key`` (downloaded now, or by a download already running).
        The caller holds a lease on it. DownloadError (ChecksumMismatch) if it cannot be had."""
        while True:
            # No await between the look at the flights and at the cache: a flight leaves the
            # table only after its image is in place, so a start never misses both.
            flight = self._flights.get(key)
            if flight is None:
                blob = self.store.blob(key)
                if blob.exists():
                    return blob
                flight = _Flight(asyncio.ensure_future(self._fetch(image, key)), image.url)
                self._flights[key] = flight
                flight.task.add_done_callback(lambda t: self._landed(key, t))
            flight.listeners.append(listener)
            try:
                return await asyncio.shield(flight.task)
            except DownloadError:
                if flight.url == image.url:
                    raise
                # Another task's URL for this digest failed (a wrong or unreachable one):
                # that is no reason for this task to fail, which tries its own URL.
            finally:
                with contextlib.suppress(ValueError):
                    flight.listeners.remove(listener)

    def _landed(self, key: str, task: asyncio.Task[Path]) -> None:
        self._flights.pop(key, None)
        if not task.cancelled():
            # Retrieved here too: every start that waited may have been cancelled meanwhile,
            # and asyncio would log an exception nobody retrieved.
            task.exception()

    async def _fetch(self, image: ImageURL, key: str) -> Path:
        self.downloads += 1
        policy = self.policy
        limits = Limits(
            policy.max_image_size,
            policy.connect_timeout,
            policy.read_timeout,
            policy.allowed_schemes,
        )
        partial = self.store.partial(key)
        async with _flocked(self.store.download_lock(key)):
            blob = self.store.blob(key)
            if blob.exists():  # another process sharing the data_dir fetched it meanwhile
                return blob
            log.info("downloading image %s into %s", image.shown, partial)
            digest = await download(image.url, partial, image.sha256, limits, self._told(key))
            # Recorded for `nomad-vm image ls` without any user:password the URL had.
            blob = await asyncio.to_thread(self.store.complete, key, image.shown, digest)
        self.schedule_gc()
        return blob

    def _told(self, key: str) -> Callable[[int, int | None], None]:
        def progress(done: int, total: int | None) -> None:
            flight = self._flights.get(key)
            now = time.monotonic()
            if flight is None or now - flight.last_told < PROGRESS_PERIOD:
                return
            flight.last_told = now
            for listener in list(flight.listeners):
                listener(done, total)

        return progress

    # -- removal -----------------------------------------------------------------------------

    def schedule_gc(self) -> None:
        """Apply the policy soon, in the background (one run at a time)."""
        if self._gc_task is None or self._gc_task.done():
            self._gc_task = asyncio.ensure_future(self.gc())

    async def gc(self) -> None:
        if not self.store.root.exists():
            return  # no image was ever downloaded here
        try:
            # Also for `nomad-vm image gc`, which applies the policy the plugin has.
            await asyncio.to_thread(self.store.save_policy, self.policy)
            removed = await asyncio.to_thread(self.store.gc, self.policy)
        except OSError as exc:
            log.warning("image cache clean-up failed: %s", exc)
            return
        for entry, why in removed:
            log.info("removed cached image %s (%s): %s", entry.key, entry.url, why)

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.task.cancel()
        if self._gc_task is not None:
            self._gc_task.cancel()


async def gc_periodically(current: Callable[[], ImageFetcher]) -> None:
    """Until cancelled: the policy every gc_interval, so an idle node ages images out too.
    ``current`` gives the plugin's fetcher of the moment (a new config may bring another)."""
    while True:
        fetcher = current()
        await fetcher.gc()
        await asyncio.sleep(fetcher.policy.gc_interval)


@contextlib.asynccontextmanager
async def _flocked(path: Path) -> AsyncIterator[None]:
    """An exclusive flock on ``path`` for the block: within this plugin the flights already
    make one download per image, this keeps it so across processes (a second plugin name
    configured with the same data_dir, a plugin restarted while the old one still ran).
    The holder removes the file when it is done, so a waiter that then holds a lock on the
    removed file starts over (as ``files.exclusive_lock`` does)."""
    while True:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the lock


def progress_message(done: int, total: int | None) -> str:
    """The event text: "Downloading image: 45% of 2.1 GiB" (or "312 MiB so far")."""
    if total:
        return f"Downloading image: {done * 100 // total}% of {_size(total)}"
    return f"Downloading image: {_size(done)} so far"


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} B"

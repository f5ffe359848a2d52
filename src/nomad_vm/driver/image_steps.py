"""StartTask's images given by URL: for each disk whose source is a URL, the task takes a
lease on the cached image (recorded in its journal first, so the replay releases it), waits
for it to be in the node's cache (downloading it, or joining the download under way, with
"Downloading image: ..." task events), and opens it like a local image: once, below its
directory, checked on the descriptor (``storage.held``). The disks are then made from it as
from any image (``disk_steps``): the cached file is the read-only base of an overlay or the
source of a copy, its format probed by qemu-img.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from nomad_vm.driver.events import EventBus
from nomad_vm.driver.image_fetch import ImageFetcher, progress_message
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.startup import StartPlan, TaskFiles
from nomad_vm.errors import ImageError
from nomad_vm.storage.download import ChecksumMismatch, DownloadError
from nomad_vm.storage.held import HeldFile, open_allowed
from nomad_vm.storage.image_store import ImageStore, cache_key
from nomad_vm.storage.image_url import ImageURL
from nomad_vm.storage.paths import Allowlist

log = logging.getLogger(__name__)

# What a cached image may name as backing file: nothing. Its bytes came from a server; only
# its checksum was chosen by the job, and a downloaded image stands alone.
NO_BACKING_FILES = Allowlist(roots=())


async def fetch_url_images(
    plan: StartPlan, recorder: TaskRecorder, events: EventBus, fetcher: ImageFetcher
) -> TaskFiles:
    """The plan's files with each URL disk's cached image opened in place of None."""
    files = plan.files
    images = list(files.disk_images) + [None] * (len(plan.vm.disks) - len(files.disk_images))
    for index, disk in enumerate(plan.vm.disks):
        if disk.url is not None:
            images[index] = await _one(plan, recorder, events, fetcher, disk.url)
    image = images[0] if images else None
    return replace(files, image=image, disk_images=tuple(images))


async def _one(
    plan: StartPlan,
    recorder: TaskRecorder,
    events: EventBus,
    fetcher: ImageFetcher,
    url: ImageURL,
) -> HeldFile:
    store = fetcher.store
    key = cache_key(url)
    lease = store.lease_path(key, plan.task.id)
    await recorder.image_lease(lease)
    await asyncio.to_thread(store.acquire, lease, plan.task.id)
    cached = store.blob(key).exists()

    def told(done: int, total: int | None) -> None:
        events.emit(plan.task, progress_message(done, total), {"url": url.shown})

    if not cached:
        events.emit(plan.task, f"Downloading image {url.shown}", {"url": url.shown})
    try:
        blob = await fetcher.ensure(url, key, told)
    except ChecksumMismatch as exc:
        raise ImageError(url.checksum_field, f"{url.shown}: {exc}") from None
    except DownloadError as exc:
        raise ImageError(url.field, f"{url.shown}: {exc}") from None
    if not cached:
        events.emit(plan.task, f"Image downloaded: {url.shown}", {"path": str(blob)})
    return await asyncio.to_thread(
        open_allowed,
        url.field,
        blob,
        Allowlist(roots=(str(store.blobs_dir()),)),
        plan.files.holder,
        subject=f"{url.shown} (cached as {blob})",
        advice="the image cache is the plugin's own directory",
    )


async def hold_leases(journal: TaskJournal) -> None:
    """A recovered VM still reads its cached images: its leases are taken again (they are
    files, so normally still there; an operator may have removed one by hand)."""
    for lease in journal.image_leases:
        path = Path(lease)
        try:
            await asyncio.to_thread(ImageStore.of_lease(path).acquire, path, journal.task_id)
        except OSError as exc:
            log.warning("cannot hold the image lease %s of %s: %s", lease, journal.task_id, exc)

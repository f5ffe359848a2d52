"""The node's image cache on disk: `<data_dir>/images`, the plugin's own state (inside
`data_dir`, so no task path can reach it: ``storage.paths``).

    images/lock                     flock: taking or dropping a lease, completing, removing
    images/policy.json              the plugin's policy, for `nomad-vm image gc`
    images/blobs/<key>              a verified image (0444), never written again
    images/blobs/<key>.json         its URL, size, sha256, when it came and was last used
    images/partial/<key>            a download in progress or interrupted (resumed with Range)
    images/partial/<key>.json       its URL and the server's validator (ETag/Last-Modified)
    images/partial/.<key>.lock      flock while <key> downloads (one download per image, also
                                    across processes sharing the data_dir); gone after it
    images/leases/<key>/<task>      one file per task using the image (its task id inside)

``key`` is the image's sha256 (content-addressed) when the task gave a checksum, else
``url-<hash of the URL>`` (the operator allowed images without one: the first download of a
URL is reused until removed).

A task takes its lease *before* it looks for or downloads the image, and the removal checks
leases under the same lock, so an image (or a partial download) in use is never removed. The
task's journal records the lease file before it exists, so the journal replay (failed start,
DestroyTask, a dead plugin's leftovers) releases it, and recovery finds it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.files import exclusive_lock, write_atomically
from nomad_vm.storage.cache_policy import CachePolicy
from nomad_vm.storage.image_url import SHA256, ImageURL

CACHE_DIR = "images"


class CacheError(Exception):
    """An operator's request the cache refuses (removing an image in use, an unknown one)."""


@dataclass(frozen=True)
class CacheEntry:
    key: str
    url: str
    size: int
    sha256: str
    added: float
    last_used: float
    complete: bool  # False: a partial download
    users: tuple[str, ...]  # task ids holding a lease


def cache_key(image: ImageURL) -> str:
    if image.sha256 is not None:
        return image.sha256
    return "url-" + hashlib.sha256(image.url.encode()).hexdigest()[:40]


def lease_name(task_id: str) -> str:
    return hashlib.sha256(task_id.encode()).hexdigest()[:32]


class ImageStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / CACHE_DIR

    @classmethod
    def of_lease(cls, lease: Path) -> ImageStore:
        """The cache a lease file (``<root>/leases/<key>/<task>``) belongs to."""
        return cls(lease.parents[3])

    # -- layout ------------------------------------------------------------------------------

    def blob(self, key: str) -> Path:
        return self.root / "blobs" / _checked(key)

    def partial(self, key: str) -> Path:
        return self.root / "partial" / _checked(key)

    def download_lock(self, key: str) -> Path:
        return self.root / "partial" / f".{_checked(key)}.lock"

    def lease_path(self, key: str, task_id: str) -> Path:
        return self.root / "leases" / _checked(key) / lease_name(task_id)

    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with exclusive_lock(self.root / "lock"):
            yield

    def save_policy(self, policy: CachePolicy) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.root / "policy.json", policy.to_json().encode(), durable=False)

    def load_policy(self) -> CachePolicy | None:
        try:
            return CachePolicy.from_json((self.root / "policy.json").read_text())
        except (OSError, ValueError, TypeError, KeyError):
            return None

    # -- leases ------------------------------------------------------------------------------

    def acquire(self, lease: Path, task_id: str) -> None:
        """Hold the image for ``task_id`` (idempotent: recovery calls it again)."""
        with self.locked():
            lease.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(lease, task_id.encode(), durable=False)
            self._touch(lease.parent.name)

    def release(self, lease: Path) -> None:
        """Drop a lease (idempotent); the image was in use until now."""
        with self.locked():
            lease.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                lease.parent.rmdir()  # only when it was the last one
            self._touch(lease.parent.name)

    def users(self, key: str) -> tuple[str, ...]:
        folder = self.root / "leases" / key
        users = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(folder)):
                with contextlib.suppress(OSError):
                    users.append((folder / name).read_text())
        return tuple(users)

    # -- images ------------------------------------------------------------------------------

    def meta(self, key: str) -> dict[str, object]:
        try:
            raw = json.loads(Path(f"{self.blob(key)}.json").read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def complete(self, key: str, url: str, sha256: str) -> Path:
        """The verified partial download becomes the image."""
        with self.locked():
            partial, blob = self.partial(key), self.blob(key)
            blob.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(partial, 0o444)
            now = time.time()
            meta = {"url": url, "sha256": sha256, "size": partial.stat().st_size}
            # The image first: a crash before its record leaves an image without one (shown
            # with its file's times), never a record without an image.
            os.replace(partial, blob)
            write_atomically(Path(f"{blob}.json"), _json({**meta, "added": now, "last_used": now}))
            Path(f"{partial}.json").unlink(missing_ok=True)
        return blob

    def discard_partial(self, key: str) -> None:
        self.partial(key).unlink(missing_ok=True)
        Path(f"{self.partial(key)}.json").unlink(missing_ok=True)

    def _touch(self, key: str) -> None:
        """Last use = now, for an image that exists (under the lock)."""
        meta = self.meta(key)
        if meta:
            meta["last_used"] = time.time()
            write_atomically(Path(f"{self.blob(key)}.json"), _json(meta), durable=False)

    def entries(self) -> list[CacheEntry]:
        out = []
        for folder, complete in ((self.root / "blobs", True), (self.root / "partial", False)):
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(folder)):
                    if name.endswith(".json") or name.startswith("."):
                        continue
                    out.append(self._entry(folder / name, complete))
        return out

    def _entry(self, path: Path, complete: bool) -> CacheEntry:
        key = path.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        raw = self.meta(key) if complete else _read_json(Path(f"{path}.json"))
        mtime = stat.st_mtime if stat else 0.0
        return CacheEntry(
            key=key,
            url=str(raw.get("url", "")),
            size=stat.st_size if stat else 0,
            sha256=str(raw.get("sha256", key if SHA256.fullmatch(key) else "")),
            added=float(raw.get("added", mtime)),  # type: ignore[arg-type]
            last_used=float(raw.get("last_used", mtime)),  # type: ignore[arg-type]
            complete=complete,
            users=self.users(key),
        )

    def remove(self, key: str) -> CacheEntry:
        """`nomad-vm image rm`: CacheError when it is in use or unknown."""
        with self.locked():
            found = [e for e in self.entries() if e.key == key or e.sha256 == key]
            if not found:
                raise CacheError(f"no image {key!r} in the cache ({self.root})")
            for entry in found:
                if entry.users:
                    raise CacheError(
                        f"image {entry.key} is in use by {', '.join(entry.users)}; it can be "
                        "removed once those tasks are destroyed"
                    )
            for entry in found:
                self._drop(entry)
            return found[0]

    def gc(self, policy: CachePolicy, now: float | None = None) -> list[tuple[CacheEntry, str]]:
        """Apply the policy: (entry, why) for each image removed. Never one with a lease."""
        now = time.time() if now is None else now
        removed: list[tuple[CacheEntry, str]] = []
        with self.locked():
            entries = self.entries()
            unused = [e for e in entries if not e.users]
            for entry in unused:
                if now - entry.last_used >= policy.max_unused_age:
                    removed.append((entry, "unused for longer than image_cache.max_unused_age"))
            gone = {e.key for e, _ in removed}
            total = sum(e.size for e in entries if e.key not in gone)
            for entry in sorted(unused, key=lambda e: e.last_used):
                if total <= policy.max_size:
                    break
                if entry.key not in gone:
                    removed.append((entry, "the cache is larger than image_cache.max_size"))
                    gone.add(entry.key)
                    total -= entry.size
            for entry, _ in removed:
                self._drop(entry)
        return removed

    def _drop(self, entry: CacheEntry) -> None:
        """Remove an image (under the lock). Tasks that already run on it keep their open
        descriptor; no task holds a lease on it, so none will open it again."""
        if entry.complete:
            self.blob(entry.key).unlink(missing_ok=True)
            Path(f"{self.blob(entry.key)}.json").unlink(missing_ok=True)
        else:
            self.discard_partial(entry.key)


def _checked(key: str) -> str:
    """A key is one path component we made: a sha256, or url-<hash>."""
    if not (SHA256.fullmatch(key) or (key.startswith("url-") and key[4:].isalnum())):
        raise ValueError(f"not an image cache key: {key!r}")
    return key


def _json(raw: object) -> bytes:
    return json.dumps(raw, sort_keys=True).encode()


def _read_json(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}

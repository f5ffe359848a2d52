"""The image cache on disk (``storage.image_store``) and `nomad-vm image ls | rm | gc` on it:
leases protect images, the policy removes unused ones by age and by size, least recently
used first, and rm refuses an image in use."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from nomad_vm.storage.cache_policy import CachePolicy, parse_duration
from nomad_vm.storage.image_store import CacheError, ImageStore
from nomad_vm.storage.image_url import ImageURL
from tests.conftest import REPO

CLI = REPO / ".venv" / "bin" / "nomad-vm"
MIB = 1024 * 1024


def put(store: ImageStore, name: str, size: int) -> str:
    """An image as a finished download leaves it; its key (the sha256)."""
    data = name.encode() * (size // len(name))
    key = hashlib.sha256(data).hexdigest()
    store.partial(key).parent.mkdir(parents=True, exist_ok=True)
    store.partial(key).write_bytes(data)
    store.complete(key, f"https://images.example/{name}", key)
    return key


def test_leases_protect_images_from_age_and_size(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    old, held, recent = put(store, "old", MIB), put(store, "held", MIB), put(store, "new", MIB)
    lease = store.lease_path(held, "alloc/task/1")
    store.acquire(lease, "alloc/task/1")
    now = time.time()
    policy = CachePolicy(max_size=100 * MIB, max_unused_age=3600)
    # Nothing is an hour old yet.
    assert store.gc(policy, now) == []
    # Two hours on: the unused ones are old, the leased one is not removed.
    removed = store.gc(policy, now + 7200)
    assert sorted(e.key for e, _ in removed) == sorted([old, recent])
    assert all("max_unused_age" in why for _, why in removed)
    assert [e.key for e in store.entries()] == [held]
    store.release(lease)
    assert store.entries()[0].users == ()
    assert not lease.parent.exists()


def test_size_pressure_removes_least_recently_used_first(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    first = put(store, "first", MIB)
    second = put(store, "second", MIB)
    third = put(store, "third", MIB)
    # `second` was used most recently, `first` least.
    for key in (first, third, second):
        lease = store.lease_path(key, "t")
        store.acquire(lease, "t")
        store.release(lease)
    removed = store.gc(CachePolicy(max_size=2 * MIB, max_unused_age=86400))
    assert [(e.key, "max_size" in why) for e, why in removed] == [(first, True)]
    assert sorted(e.key for e in store.entries()) == sorted([second, third])


def test_remove_refuses_an_image_in_use(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    key = put(store, "img", MIB)
    lease = store.lease_path(key, "alloc/web/1")
    store.acquire(lease, "alloc/web/1")
    with pytest.raises(CacheError, match="in use by alloc/web/1"):
        store.remove(key)
    store.release(lease)
    assert store.remove(key).key == key
    assert store.entries() == []
    with pytest.raises(CacheError, match="no image"):
        store.remove(key)


def test_keys_are_digests_or_url_hashes_never_paths(tmp_path: Path) -> None:
    from nomad_vm.storage.image_store import cache_key

    store = ImageStore(tmp_path)
    with pytest.raises(ValueError):
        store.blob("../../etc/passwd")
    key = cache_key(ImageURL("https://h/x.img", None, "config.image", "config.image_checksum"))
    assert key.startswith("url-") and store.blob(key).parent == store.root / "blobs"


def test_durations() -> None:
    assert parse_duration("f", "1h30m") == 5400
    assert parse_duration("f", "7d") == 7 * 86400
    with pytest.raises(Exception, match="f: '1 week' is not a duration"):
        parse_duration("f", "1 week")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), "image", *args], capture_output=True, text=True, timeout=60)


def test_the_operator_commands(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    busy, idle = put(store, "busy", 2 * MIB), put(store, "idle", MIB)
    store.acquire(store.lease_path(busy, "alloc/web/1"), "alloc/web/1")
    store.save_policy(CachePolicy(max_unused_age=0))
    out = cli("ls", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["DIGEST", "SIZE", "LAST"]
    assert any(busy[:16] in line and "alloc/web/1" in line and "/busy" in line for line in lines)
    assert any(idle[:16] in line and " - " in line for line in lines), lines

    refused = cli("rm", busy[:12], "--data-dir", str(tmp_path))
    assert refused.returncode == 1 and "in use by alloc/web/1" in refused.stdout

    # The plugin's policy (max_unused_age 0s) from the cache: the idle image goes.
    gc = cli("gc", "--data-dir", str(tmp_path))
    assert gc.returncode == 0, gc.stderr
    assert f"removed {idle}" in gc.stdout and "1 removed, 1 kept" in gc.stdout
    assert [e.key for e in store.entries()] == [busy]

    bad = cli("gc", "--data-dir", str(tmp_path), "--max-unused-age", "soon")
    assert bad.returncode == 2 and "--max-unused-age" in bad.stdout

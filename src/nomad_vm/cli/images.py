"""`nomad-vm image ls | rm | gc`: the node's image cache (images tasks gave by URL), for
operators. It works on the files the plugin keeps (``storage.image_store``) under the same
lock, so it can run while the plugin serves tasks."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from nomad_vm.errors import ConfigError
from nomad_vm.storage.cache_policy import CachePolicy, parse_duration
from nomad_vm.storage.disk_request import parse_size
from nomad_vm.storage.image_store import CacheError, ImageStore

GIB = 1024**3
MIB = 1024**2


def add_parsers(image_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default="/var/lib/nomad-vm",
        help="the plugin's data_dir; the cache is its images/ directory (%(default)s)",
    )
    ls = image_sub.add_parser(
        "ls", parents=[common], help="list cached images: digest, URL, size, last use, users"
    )
    ls.set_defaults(func=cmd_ls)
    rm = image_sub.add_parser(
        "rm", parents=[common], help="remove a cached image (refused while a task uses it)"
    )
    rm.add_argument("key", help="its digest (sha256 hex) or cache key, as `image ls` shows")
    rm.set_defaults(func=cmd_rm)
    gc = image_sub.add_parser(
        "gc",
        parents=[common],
        help="apply the removal policy now (the plugin's image_cache, unless overridden)",
    )
    gc.add_argument("--max-size", help="e.g. 50GiB (default: the plugin's max_size)")
    gc.add_argument("--max-unused-age", help="e.g. 72h (default: the plugin's max_unused_age)")
    gc.set_defaults(func=cmd_gc)


def cmd_ls(args: argparse.Namespace) -> int:
    store = ImageStore(Path(args.data_dir))
    entries = store.entries()
    if not entries:
        print(f"no cached images in {store.root}")
        return 0
    now = time.time()
    rows = [("DIGEST", "SIZE", "LAST USE", "IN USE BY", "URL")]
    for e in entries:
        digest = (e.sha256 or e.key)[:16] + ("" if e.complete else " (partial)")
        users = ", ".join(e.users) or "-"
        rows.append((digest, _size(e.size), _ago(now - e.last_used), users, e.url))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = ImageStore(Path(args.data_dir))
    key = args.key.removeprefix("sha256:")
    matches = [e for e in store.entries() if e.key.startswith(key) or e.sha256.startswith(key)]
    if len({e.key for e in matches}) > 1:
        print(f"FAIL  {args.key!r} names several images; give more of the digest")
        return 1
    try:
        entry = store.remove(matches[0].key if matches else key)
    except CacheError as exc:
        print(f"FAIL  {exc}")
        return 1
    print(f"removed {entry.key} ({entry.url}, {_size(entry.size)})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = ImageStore(Path(args.data_dir))
    if not store.root.exists():
        print(f"no image cache in {store.root}")
        return 0
    policy = store.load_policy() or CachePolicy()
    try:
        if args.max_size:
            size = parse_size(args.max_size, "--max-size")
            policy = replace(policy, max_size=size or 0)
        if args.max_unused_age:
            age = parse_duration("--max-unused-age", args.max_unused_age)
            policy = replace(policy, max_unused_age=age)
    except ConfigError as exc:
        print(f"FAIL  {exc}")
        return 2
    removed = store.gc(policy)
    for entry, why in removed:
        print(f"removed {entry.key} ({entry.url}, {_size(entry.size)}): {why}")
    kept = store.entries()
    print(f"{len(removed)} removed, {len(kept)} kept ({_size(sum(e.size for e in kept))})")
    return 0


def _size(n: int) -> str:
    return f"{n / GIB:.1f}GiB" if n >= GIB else f"{n / MIB:.1f}MiB" if n >= MIB else f"{n}B"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"

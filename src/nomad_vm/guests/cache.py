"""The cache mechanics every test guest shares: a lock, a manifest, an atomic publish.

A guest directory holds its outputs and ``manifest.json``, which records the build's inputs and
each output's size and sha256. The manifest is removed before outputs are replaced and written
last, so a manifest never vouches for a mix of old and new files; a reader that finds one can
trust the files it lists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@contextmanager
def locked(guest_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock so parallel sessions build once and never see half a build."""
    with (guest_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(guest_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((guest_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(path: Path) -> dict[str, Any]:
    """Size and sha256 of an output, as the manifest records them."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def publish(
    guest_dir: Path, outputs: Mapping[str, Path], manifest: Mapping[str, Any], scratch: Path
) -> None:
    """Move finished outputs (name -> built file) into ``guest_dir``, then write the manifest."""
    (guest_dir / MANIFEST).unlink(missing_ok=True)
    for name, path in outputs.items():
        os.replace(path, guest_dir / name)
    pending = scratch / MANIFEST
    pending.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(pending, guest_dir / MANIFEST)

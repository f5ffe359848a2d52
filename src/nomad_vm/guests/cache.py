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
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nomad_vm.errors import GuestBuildError

log = logging.getLogger(__name__)

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


class Inputs(Protocol):
    """What a guest is built from; ``key()`` is recorded in the manifest to detect changes."""

    def key(self) -> dict[str, Any]: ...


InputsT = TypeVar("InputsT", bound=Inputs)
GuestT = TypeVar("GuestT")


def build_or_reuse(
    guest_dir: Path,
    *,
    label: str,
    force: bool,
    current_inputs: Callable[[], InputsT],
    from_manifest: Callable[[Path, dict[str, Any]], GuestT | None],
    build: Callable[[InputsT], GuestT],
) -> GuestT:
    """The cached guest when its manifest records the current inputs, else a fresh build.

    If the current inputs cannot be determined (apt unavailable) an existing build is used with
    a warning rather than failing; ``force`` always rebuilds.
    """
    guest_dir.mkdir(parents=True, exist_ok=True)
    with locked(guest_dir):
        manifest = read_manifest(guest_dir)
        try:
            inputs = current_inputs()
        except GuestBuildError as exc:
            existing = None if manifest is None else from_manifest(guest_dir, manifest)
            if force or existing is None:
                raise
            log.warning("cannot check %s guest inputs (%s); using the cached build", label, exc)
            return existing
        if not force and manifest is not None and manifest.get("inputs") == inputs.key():
            existing = from_manifest(guest_dir, manifest)
            if existing is not None:
                return existing
        return build(inputs)

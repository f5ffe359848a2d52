"""A task's `seed_files`: files for the seed ISO's root, for guests that provision themselves
without cloud-init (Windows Setup reads `autounattend.xml` from the root of removable media;
cloudbase-init reads its own). Each is read once from the descriptor that was checked
(``storage.held``), at planning, so a bad entry fails the start before anything exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nomad_vm.errors import ConfigError
from nomad_vm.storage.held import FileHolder, open_allowed
from nomad_vm.storage.paths import Allowlist, resolve_allowed_file

FIELD = "config.seed_files"
MAX_FILES = 16
MAX_BYTES = 8 * 2**20
# The cloud-init documents the seed may hold itself.
RESERVED = ("meta-data", "user-data", "network-config")
# What an ISO's Joliet and Rock Ridge names take here: no path, nothing a reader could trip on.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def seed_file_paths(raw: object, allowed: Allowlist, task_dir: str) -> tuple[Path, ...]:
    """The `seed_files` option's paths, each resolved and allowed (read later, at planning)."""
    names = [str(p) for p in raw] if isinstance(raw, list) else []
    return tuple(
        resolve_allowed_file(f"config.seed_files[{i}]", name, allowed, task_dir)
        for i, name in enumerate(names)
    )


def read_seed_files(paths: tuple[Path, ...], allowed: Allowlist) -> tuple[tuple[str, bytes], ...]:
    """(name in the ISO, content) of each file, in order."""
    if len(paths) > MAX_FILES:
        raise ConfigError(FIELD, f"{len(paths)} files: at most {MAX_FILES} fit the seed")
    files: list[tuple[str, bytes]] = []
    total = 0
    with FileHolder() as holder:
        for i, path in enumerate(paths):
            field = f"{FIELD}[{i}]"
            name = path.name
            if not NAME.fullmatch(name) or name.lower() in RESERVED:
                raise ConfigError(
                    field,
                    f"{name!r} cannot be a seed file name (letters, digits, '.', '_', '-', at "
                    f"most 64, not {', '.join(RESERVED)})",
                )
            if any(name.lower() == other.lower() for other, _ in files):
                raise ConfigError(field, f"a seed file named {name!r} is already listed")
            held = open_allowed(
                field,
                path,
                allowed,
                holder,
                subject=str(path),
                advice="add its directory to the plugin's image_paths",
            )
            with os.fdopen(os.dup(held.fd), "rb") as f:
                data = f.read(MAX_BYTES + 1)
            total += len(data)
            if total > MAX_BYTES:
                raise ConfigError(field, f"the seed files exceed {MAX_BYTES // 2**20} MiB in all")
            files.append((name, data))
    return tuple(files)

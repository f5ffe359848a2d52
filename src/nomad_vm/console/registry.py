"""The console registry: which task on this node has a VNC socket, and where.

The plugin (root) writes one entry per started task that has a display, in
``<data_dir>/consoles/`` (0700, entries 0600): the allocation, the task, and the path of the
VNC socket in that task's runtime directory. The console server (root) reads it. A job can
write neither the directory nor the runtime directory, so an entry can only point at the
socket of the task it names; the entry is in the task's journal, so DestroyTask (or a failed
start's replay) removes it with everything else.

Which entries a caller may open is not decided here: the console server asks Nomad, for the
allocation id in the entry (``console.access``). The namespace and job kept here are for
display only.

This module is a leaf (stdlib only): the driver imports it to write, the console server to read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DIRECTORY = "consoles"
VERSION = 1


@dataclass(frozen=True)
class ConsoleEntry:
    alloc_id: str
    task: str
    namespace: str
    job: str
    display: str
    socket: str

    @property
    def key(self) -> str:
        """The entry's name in URLs: ``<alloc id>/<task>``, both of which Nomad knows."""
        return f"{self.alloc_id}/{self.task}"


def entry_path(data_dir: Path, task_id: str) -> Path:
    """One file per task start, named from Nomad's task id (which holds names a job chose)."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    return data_dir / DIRECTORY / f"{digest}.json"


def encode(entry: ConsoleEntry) -> bytes:
    return json.dumps({"version": VERSION, **asdict(entry)}, sort_keys=True).encode()


def ensure_directory(data_dir: Path) -> Path:
    directory = data_dir / DIRECTORY
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def read_entries(data_dir: Path) -> list[ConsoleEntry]:
    """Every readable entry; a missing directory is no entries. A directory or entry that
    someone other than root could have written is ignored (it could point anywhere)."""
    directory = data_dir / DIRECTORY
    try:
        if not _owned_privately(directory.stat()):
            return []
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        entry = _read_entry(directory / name)
        if entry is not None:
            entries.append(entry)
    return entries


def _owned_privately(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_entry(path: Path) -> ConsoleEntry | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # removed meanwhile (the task ended), or a symlink
    with os.fdopen(fd, "rb") as f:
        if not _owned_privately(os.fstat(f.fileno())):
            return None
        try:
            data = json.loads(f.read(65536))
            if data.get("version") != VERSION:
                return None
            return ConsoleEntry(**{k: str(data[k]) for k in ConsoleEntry.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

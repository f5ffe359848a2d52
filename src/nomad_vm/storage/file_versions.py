"""What the plugin remembers about a user's image files, per file *version*.

Every start of a task from the same image would otherwise run qemu-img on it again (tens of ms
each on the start path, more for large qcow2 files). What qemu-img said about a file holds as
long as the file is the same version: any write changes its mtime and ctime (ctime cannot be set
by a user), a replacement its inode. The checks made on what qemu-img said (allowed paths,
formats) are made again at every start; only qemu-img's answers are remembered. A block
device (a Nomad volume's disk) is never remembered: written other than through its node, its
stat shows no change (``chain``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from nomad_vm.storage.held import HeldFile

# Images a node boots are few; this bounds the memory whatever happens.
DEFAULT_LIMIT = 256

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class FileVersion:
    """One version of a file: any write changes mtime and ctime, a replacement the inode."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileVersion | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # qemu-img will say what is wrong with it
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_held(cls, held: HeldFile) -> FileVersion:
        """The version of an open file (``held.path`` is where it was opened)."""
        st = held.fstat()
        return cls(held.path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VersionMemo(Generic[K, V]):
    """A bounded map (keys naming file versions) that forgets the least recently used first.
    Thread-safe: disks are prepared in worker threads, several tasks at once."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._known: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._known:
                return None
            self._known.move_to_end(key)
            return self._known[key]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._known[key] = value
            self._known.move_to_end(key)
            while len(self._known) > self._limit:
                self._known.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)

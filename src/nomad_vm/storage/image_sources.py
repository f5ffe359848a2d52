"""How qemu-img is told which file to read: a path, or a descriptor the plugin holds.

A held file is read as ``/proc/self/fd/N`` (qemu-img inherits the descriptor), and a chain of
them as one ``json:`` filename in which every backing file is explicit and the last has none,
so qemu-img never opens a name recorded in an image header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomad_vm.storage.held import HeldFile

# A file for qemu-img: a path, or a descriptor the plugin holds.
Source = Path | HeldFile
# Formats whose images may have a backing file (a raw node takes no "backing" option).
_BACKED_FORMATS = frozenset({"qcow2", "qed", "vmdk"})


def json_filename(chain: Sequence[tuple[Source, str]]) -> str:
    """A ``json:`` filename for the image ``chain[0]`` with the rest of ``chain`` (nearest
    first) as its explicit backing files and none below the last."""
    node: dict[str, Any] | None = None
    for source, fmt in reversed(chain):
        file = {"driver": "file", "filename": name_of(source)}
        level: dict[str, Any] = {"driver": fmt, "file": file}
        if fmt in _BACKED_FORMATS:
            level["backing"] = node
        elif node is not None:
            raise ValueError(f"a {fmt} image cannot have a backing file")
        node = level
    if node is None:
        raise ValueError("an empty chain")
    return "json:" + json.dumps(node, separators=(",", ":"))


def name_of(source: Source) -> str:
    """What qemu-img opens: a held file's descriptor (inherited), or the absolute path."""
    return source.proc_path if isinstance(source, HeldFile) else os.path.abspath(source)


def real_path(source: Source) -> Path:
    return source.path if isinstance(source, HeldFile) else source


def shown(source: Source) -> str:
    """For messages: the file's real path (a descriptor number means nothing to a user)."""
    return str(source.path) if isinstance(source, HeldFile) else os.path.abspath(source)


def fds_of(sources: Sequence[Source]) -> tuple[int, ...]:
    return tuple(s.fd for s in sources if isinstance(s, HeldFile))

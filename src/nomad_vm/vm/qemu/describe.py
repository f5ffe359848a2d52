"""A running QEMU described through QMP (``query-kvm``, ``query-cpus-fast``,
``query-memory-size-summary``, ``query-block``, ``query-fdsets``).

Disks are opened by the plugin and handed over as descriptors (files_argv), so QEMU names them
``/dev/fdset/N``: the descriptor's target is read from /proc/<QEMU>/fd (root, like the plugin),
which names the file QEMU really has open, whatever happened to the path since.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nomad_vm.vm.description import DiskView, VMDescription
from nomad_vm.vm.qemu.display import VNC_SOCKET
from nomad_vm.vm.qemu.monitor import QemuMonitor

FDSET = re.compile(r"^/dev/fdset/(\d+)$")


async def describe_qemu(monitor: QemuMonitor, pid: int, runtime_dir: Path) -> VMDescription:
    kvm = await monitor.execute("query-kvm")
    cpus = await monitor.execute("query-cpus-fast")
    memory = await monitor.execute("query-memory-size-summary")
    blocks = await monitor.execute("query-block")
    fdsets = await monitor.execute("query-fdsets")
    accelerator = "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "tcg"
    memory = memory if isinstance(memory, dict) else {}
    vnc = runtime_dir / VNC_SOCKET
    return VMDescription(
        accelerator=accelerator,
        vcpus=len(cpus) if isinstance(cpus, list) else 0,
        memory_bytes=int(memory.get("base-memory", 0)),
        plugged_memory_bytes=int(memory.get("plugged-memory", 0)),
        disks=disks_from(blocks, _fdset_targets(fdsets, pid)),
        vnc_socket=str(vnc) if vnc.exists() else None,
    )


def disks_from(blocks: object, fdsets: dict[int, str]) -> tuple[DiskView, ...]:
    """``query-block``'s devices with a medium, named by our blockdev node names."""
    found = []
    for block in blocks if isinstance(blocks, list) else []:
        inserted = block.get("inserted") if isinstance(block, dict) else None
        if not isinstance(inserted, dict):
            continue  # an empty cdrom drive
        image = inserted.get("image") or {}
        backing = image.get("backing-image") or {}
        name = inserted.get("node-name") or block.get("qdev") or block.get("device") or ""
        found.append(
            DiskView(
                name=str(name),
                file=file_of(str(image.get("filename") or inserted.get("file") or ""), fdsets),
                read_only=bool(inserted.get("ro")),
                format=str(image.get("format") or inserted.get("drv") or ""),
                backing=file_of(str(backing.get("filename") or ""), fdsets),
            )
        )
    return tuple(found)


def file_of(filename: str, fdsets: dict[int, str]) -> str:
    """The host file behind a block node's filename: a ``json:`` pseudo-filename (an overlay
    opened with its backing given explicitly) names its own file in ``file``; an fdset is the
    descriptor's target."""
    if filename.startswith("json:"):
        try:
            spec = json.loads(filename[len("json:") :])
            filename = str(spec["file"]["filename"])
        except (ValueError, KeyError, TypeError):
            return filename
    match = FDSET.match(filename)
    return fdsets.get(int(match.group(1)), filename) if match else filename


def _fdset_targets(fdsets: object, pid: int) -> dict[int, str]:
    targets: dict[int, str] = {}
    for fdset in fdsets if isinstance(fdsets, list) else []:
        fds = fdset.get("fds") or [] if isinstance(fdset, dict) else []
        for fd in fds:
            try:
                targets[int(fdset["fdset-id"])] = os.readlink(f"/proc/{pid}/fd/{int(fd['fd'])}")
                break
            except (OSError, KeyError, TypeError, ValueError):
                continue
    return targets

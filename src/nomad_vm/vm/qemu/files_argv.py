"""The files QEMU reads and writes, given as descriptors: the disk and its backing chain, the
cloud-init seed, the UEFI flash images, the kernel and initramfs. A pure function of the spec.

QEMU never opens a file by name (``nomad_vm.storage.held`` says why), so it needs no
filesystem permission on any of them:

* Block devices (disk, backing files, seed, flash) are ``-add-fd fd=N,set=S`` plus a
  ``-blockdev`` whose file is ``/dev/fdset/S``: QEMU's ``qemu_open`` takes a descriptor of the
  set with the access mode it wants (read-only nodes get an ``O_RDONLY`` descriptor, the task's
  disk and variable store an ``O_RDWR`` one). ``-add-fd`` takes the descriptor over (QEMU
  keeps a duplicate and closes the number it was given), so a number is never in two sets nor
  also used by name.
* The task's qcow2 disk gets its backing chain as explicit ``-blockdev`` nodes (``backing``
  names the node below, ``null`` the end), so QEMU never opens the names recorded in the image
  headers; a copy gets ``backing: null``.
* The kernel and initramfs are loaded with plain ``open``, which does not know fdsets, so they
  are ``/proc/self/fd/N``: the magic link names the inode the plugin checked (the plugin hands
  an unprivileged QEMU a sealed copy of one it could not reopen, see ``held.readable_copy``).

Blockdev options are JSON (``-blockdev {...}``): a ``backing`` of ``null`` has no key=value
spelling, and JSON needs no comma escaping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from nomad_vm.storage.held import HeldFile
from nomad_vm.storage.rbd_volumes import rbd_target
from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.machine import FLASH_NODES
from nomad_vm.vm.spec import DiskSpec, RbdSpec, VMSpec

DISK_NODE = "disk0"
SEED_NODE = "seed0"


class FdSets:
    """Numbers the ``-add-fd`` sets of one command line, from 1 in order of use."""

    def __init__(self) -> None:
        self._next = 1

    def add(self, held: HeldFile) -> tuple[list[str], str]:
        """The ``-add-fd`` argv for ``held`` and the name QEMU opens it by."""
        return self.add_fd(held.fd)

    def add_fd(self, fd: int) -> tuple[list[str], str]:
        """The same for a descriptor that is not a file of ours (the task's stdout FIFO)."""
        fdset = self._next
        self._next += 1
        return ["-add-fd", f"fd={fd},set={fdset}"], f"/dev/fdset/{fdset}"


def blockdev(
    sets: FdSets,
    node: str,
    fmt: str,
    held: HeldFile,
    *,
    backing: str | bool | None = False,
    protocol: str = "file",
    **options: Any,
) -> list[str]:
    """``-add-fd`` and ``-blockdev`` for one image file: format node ``node`` on a file node
    reading ``held``; read-only unless ``held`` is writable. ``backing``: the node name of its
    backing image, None for none (``null``), False to leave it out (formats without one).
    ``protocol``: ``host_device`` for a block device."""
    add, name = sets.add(held)
    read_only = not held.writable
    file = {"driver": protocol, "filename": name, "read-only": read_only}
    node_options: dict[str, Any] = {"driver": fmt, "node-name": node, "read-only": read_only}
    if backing is not False:
        node_options["backing"] = backing
    node_options.update(options)
    node_options["file"] = {**file, **options}
    return [*add, "-blockdev", json.dumps(node_options, separators=(",", ":"))]


def disk_argv(sets: FdSets, disk: DiskSpec, name: str = DISK_NODE, **options: Any) -> list[str]:
    """A task's disk as node ``name`` (``disk0``: the primary), above its explicit backing
    chain (nearest first in ``disk.backing``; nodes ``disk0-b1``, ``disk0-b2``, ... down to
    the base); ``options`` go to its own nodes (the cache mode). A raw disk has no backing."""
    if disk.rbd is not None:
        return rbd_argv(disk.rbd, name, **options)
    if disk.file is None:
        raise ValueError("a disk is a file or an RBD image")
    argv: list[str] = []
    below: str | None = None
    for depth, (held, fmt) in reversed(list(enumerate(disk.backing, start=1))):
        node = f"{name}-b{depth}"
        argv += blockdev(sets, node, fmt, held, backing=below if fmt != "raw" else False)
        below = node
    backing: str | bool | None = below if disk.format != "raw" else False
    if disk.file.writable:
        options = {"discard": "unmap", **options}
    protocol = "host_device" if disk.block_device else "file"
    argv += blockdev(
        sets, name, disk.format, disk.file, backing=backing, protocol=protocol, **options
    )
    return argv


def rbd_argv(rbd: RbdSpec, name: str, **options: Any) -> list[str]:
    """An RBD image as raw node ``name`` on an rbd node QEMU's librbd opens: the key is the
    secret object ``<name>-key``, read from the inherited memfd ``rbd.key``
    (``storage.rbd_keys``), so neither the command line nor a file holds it."""
    if rbd.key is None:
        raise ValueError("an RBD disk needs its key descriptor (made at launch)")
    secret = f"{name}-key"
    file = {**rbd_target(rbd.pool, rbd.image, secret), "read-only": rbd.read_only, **options}
    if not rbd.read_only:
        file["discard"] = "unmap"  # the guest's discards free space in the pool
    node = {"driver": "raw", "node-name": name, "read-only": rbd.read_only, **options}
    node["file"] = file
    return [
        "-object", f"secret,id={secret},file={rbd.key.proc_path},format=base64",
        "-blockdev", json.dumps(node, separators=(",", ":")),
    ]  # fmt: skip


def seed_argv(sets: FdSets, seed: HeldFile) -> list[str]:
    return blockdev(sets, SEED_NODE, "raw", seed)


def firmware_argv(
    sets: FdSets, plan: FirmwarePlan | None, code: HeldFile | None, variables: HeldFile | None
) -> list[str]:
    """The UEFI flash images as the nodes ``-machine pflash0=,pflash1=`` names (see
    ``machine.machine_argv``): the shared code read-only, the task's variable store writable.
    Both are given exactly when there is a plan (ValueError otherwise: a programming error)."""
    if plan is None:
        if code is not None or variables is not None:
            raise ValueError("BIOS boot takes no firmware files")
        return []
    if code is None or variables is None or code.writable or not variables.writable:
        raise ValueError(f"{plan.kind} needs the code read-only and the variable store writable")
    code_node, vars_node = FLASH_NODES
    return [
        *blockdev(sets, code_node, "raw", code),
        *blockdev(sets, vars_node, "raw", variables),
    ]


def boot_argv(spec: VMSpec) -> list[str]:
    if spec.kernel is None:
        return []
    argv = ["-kernel", spec.kernel.proc_path]
    if spec.initramfs is not None:
        argv += ["-initrd", spec.initramfs.proc_path]
    if spec.cmdline:
        argv += ["-append", spec.cmdline]
    return argv


def inherited_fds(spec: VMSpec) -> tuple[int, ...]:
    """Every descriptor the command line names: QEMU must inherit these, and only these."""
    sockets = (spec.control_fd, spec.agent_fd, spec.serial_fd, spec.console_log_fd)
    shares = [fd for s in spec.shares for fd in (s.socket_fd, s.host_fd)]
    nics = [nic.fd for nic in spec.nics]
    extra = (spec.tpm_fd, spec.incoming_fd)
    others = [fd for fd in (*sockets, *shares, *nics, *extra) if fd is not None]
    return tuple(held.fd for held in _files(spec)) + tuple(others)


def _files(spec: VMSpec) -> Iterator[HeldFile]:
    for disk in (*([spec.disk] if spec.disk is not None else []), *spec.extra_disks):
        if disk.file is not None:
            yield disk.file
        if disk.rbd is not None and disk.rbd.key is not None:
            yield disk.rbd.key
        yield from (held for held, _ in disk.backing)
    for held in (spec.seed, spec.firmware_code, spec.firmware_vars, spec.kernel, spec.initramfs):
        if held is not None:
            yield held

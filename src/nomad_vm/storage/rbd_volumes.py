"""RBD image operations of a Ceph pool, through the bindings (``ceph_pool.connect``), and the
one qemu-img step: writing a job's source image into an RBD image.

Every call is idempotent where the replay needs it (removing an image or a snapshot that is
already gone is no error), and names come from ``names``: the plugin's own images start
with ``nomad-vm-``, the jobs' volumes are the names they chose.

A source image is written once per pool (``import_image``): its chain is walked and checked
as for any disk (``storage.chain``: allowlist, descriptors, limits), qemu-img converts it into
an RBD image the bindings made (``-n``: qemu-img creates nothing), with the cephx key read
from a sealed memfd (``rbd_keys``); the image then gets the protected snapshot clones are
made from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomad_vm.storage.ceph_pool import CephPool
from nomad_vm.storage.held import FileHolder, HeldFile
from nomad_vm.storage.image_sources import fds_of, json_filename
from nomad_vm.storage.limits import Limits
from nomad_vm.storage.qemu_img_run import run_qemu_img
from nomad_vm.storage.rbd_keys import key_memfd

# The snapshot of an imported image that its clones hang from (protected, never removed
# while the image is kept).
BASE_SNAPSHOT = "nomad-vm-base"
# librbd's layering is all clones need; other features (exclusive-lock, object-map) are
# left to the pool's defaults for images nomad-vm does not clone.
FEATURES_LAYERING = 1


def exists(rbd: Any, ioctx: Any, name: str) -> bool:
    try:
        rbd.Image(ioctx, name, read_only=True).close()
    except rbd.ImageNotFound:
        return False
    return True


def in_use(rbd: Any, ioctx: Any, name: str) -> bool:
    """Does a client hold ``name`` open for writing (a running VM's librbd watches the image
    header; read-only opens, like this one, do not)?"""
    image = rbd.Image(ioctx, name, read_only=True)
    try:
        return bool(list(image.watchers_list()))
    finally:
        image.close()


def size_of(rbd: Any, ioctx: Any, name: str) -> int:
    image = rbd.Image(ioctx, name, read_only=True)
    try:
        return int(image.size())
    finally:
        image.close()


def create(rbd: Any, ioctx: Any, name: str, size: int) -> None:
    rbd.RBD().create(ioctx, name, size, old_format=False, features=FEATURES_LAYERING)


def grow(rbd: Any, ioctx: Any, name: str, size: int) -> None:
    """Resize ``name`` to ``size`` (callers have refused a shrink)."""
    image = rbd.Image(ioctx, name)
    try:
        if image.size() < size:
            image.resize(size)
    finally:
        image.close()


def protected_snapshot(rbd: Any, ioctx: Any, name: str, snap: str) -> None:
    """``name@snap`` exists and is protected (clones need it)."""
    image = rbd.Image(ioctx, name)
    try:
        if snap not in {s["name"] for s in image.list_snaps()}:
            image.create_snap(snap)
        if not image.is_protected_snap(snap):
            image.protect_snap(snap)
    finally:
        image.close()


def clone(rbd: Any, ioctx: Any, parent: str, snap: str, child: str) -> None:
    rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=FEATURES_LAYERING)


def flatten(rbd: Any, ioctx: Any, name: str) -> None:
    """Copy the parent's data into the clone: it no longer depends on the parent."""
    image = rbd.Image(ioctx, name)
    try:
        image.flatten()
    finally:
        image.close()


def copy(rbd: Any, ioctx: Any, source: str, dest: str) -> None:
    """A full, independent copy of ``source``'s current data (not its snapshots)."""
    image = rbd.Image(ioctx, source, read_only=True)
    try:
        image.copy(ioctx, dest, features=FEATURES_LAYERING)
    finally:
        image.close()


def rename(rbd: Any, ioctx: Any, source: str, dest: str) -> bool:
    """Give ``source`` the name ``dest``; False (and ``source`` untouched) when an image of
    that name appeared meanwhile: a volume is never replaced."""
    try:
        rbd.RBD().rename(ioctx, source, dest)
    except rbd.ImageExists:
        return False
    return True


def remove(rbd: Any, ioctx: Any, name: str) -> None:
    """Remove ``name`` (and its unprotected snapshots); gone already is fine."""
    try:
        image = rbd.Image(ioctx, name)
    except rbd.ImageNotFound:
        return
    try:
        for snap in list(image.list_snaps()):
            if image.is_protected_snap(snap["name"]):
                image.unprotect_snap(snap["name"])
            image.remove_snap(snap["name"])
    finally:
        image.close()
    with contextlib.suppress(rbd.ImageNotFound):
        rbd.RBD().remove(ioctx, name)


def remove_snapshot(rbd: Any, ioctx: Any, name: str, snap: str) -> None:
    """Unprotect and remove ``name@snap``; gone already is fine. Fails (ImageBusy) while a
    clone of it exists: the replay removes clones first."""
    try:
        image = rbd.Image(ioctx, name)
    except rbd.ImageNotFound:
        return
    try:
        if snap not in {s["name"] for s in image.list_snaps()}:
            return
        if image.is_protected_snap(snap):
            image.unprotect_snap(snap)
        image.remove_snap(snap)
    finally:
        image.close()


def rbd_target(pool: CephPool, image: str, secret_id: str) -> dict[str, Any]:
    """QEMU's rbd node for ``image``: monitors, user and the key's secret object; no
    ceph.conf is read (``/dev/null``), so only the pool block's settings apply."""
    return {
        "driver": "rbd",
        "pool": pool.pool,
        "image": image,
        "server": [{"host": m.host, "port": str(m.port)} for m in pool.monitors],
        "user": pool.username,
        "key-secret": secret_id,
        "auth-client-required": ["cephx"],
        "conf": "/dev/null",
    }


def import_image(
    qemu_img: Path,
    chain: Sequence[tuple[HeldFile, str]],
    pool: CephPool,
    dest: str,
    limits: Limits,
) -> None:
    """Write the image ``chain`` (top first, each with its format) into the existing RBD
    image ``dest`` as raw data. Zero runs are skipped (``-S``): the image stays thin."""
    with FileHolder() as holder:
        key = key_memfd(pool.secret, holder, owner=None)
        target = {"driver": "raw", "file": rbd_target(pool, dest, "key0")}
        argv = [
            str(qemu_img), "convert", "-q", "-n", "-S", "4k",
            "--object", f"secret,id=key0,file={key.proc_path},format=base64",
            json_filename(list(chain)),
            "-O", "raw", "json:" + json.dumps(target, separators=(",", ":")),
        ]  # fmt: skip
        what = f"qemu-img convert {chain[0][0].path} -> rbd {pool.pool}/{dest}"
        run_qemu_img(argv, None, what, limits, (*fds_of([h for h, _ in chain]), key.fd))

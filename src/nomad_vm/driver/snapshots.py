"""Snapshots: a task's VM saved when it stops and resumed at its next start (`snapshot_on_stop`),
or saved on an operator's request (`nomad-vm vm snapshot`).

* A start of a task with `snapshot_on_stop` leaves ``snapshot.json`` in its runtime directory:
  the record of the machine (``machine_record``) and the names of the runtime directory's files
  that hold its state besides memory (disk overlays, the UEFI variable store). That file, not
  the plugin's memory, says what to save at the stop, so it holds across plugin restarts.
* Saving (``save``): the VM is paused, QEMU writes its memory and device state to a descriptor
  of ``state`` (``RunningVM.save_state``), and those files are moved (at a stop) or copied (the
  VM keeps running) next to it, in the task's snapshot directory (``snapshot_store``).
* Every start looks for a snapshot (``find_restore``). One whose record does not match the
  machine the task asks for now is refused with a task event naming what differs, removed,
  and the VM boots; a matching one is resumed: its files replace the fresh ones the start made,
  and the VMM loads ``state`` instead of booting. It is used once: removed as soon as the VM
  has resumed (``consume``), or when the resume failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nomad_vm.driver import snapshot_seal as sealing
from nomad_vm.driver import snapshot_store as store
from nomad_vm.driver.snapshot_store import Restore
from nomad_vm.driver.startup import StartPlan
from nomad_vm.errors import HypervisorError
from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.firmware import VARS_FILE
from nomad_vm.vm.hypervisor import RunningVM

log = logging.getLogger(__name__)

# In the runtime directory of a start with snapshot_on_stop: what to save when it stops.
SETUP_FILE = "snapshot.json"
RECORD_VERSION = 1
# How long writing the state may take (a few hundred MB to a local file).
SAVE_TIMEOUT = 300.0


def _identity(held: HeldFile | None) -> list[object] | None:
    """A file the machine was made from, as the plugin opened it: its path, size and mtime (a
    disk overlay on a base image that changed since would be garbage)."""
    if held is None:
        return None
    st = os.fstat(held.fd)
    return [str(held.path), st.st_size, st.st_mtime_ns]


def machine_record(plan: StartPlan) -> dict[str, Any]:
    """What makes the machine: a saved state only fits a VMM started with the same."""
    request = plan.vm_plan.request
    images = plan.files.disk_images
    disks = [
        {
            "field": d.field,
            "image": _identity(images[i] if i < len(images) else None),
            "url": d.url.shown if d.url is not None else None,
            "format": d.format,
            "bus": d.bus,
            "kind": d.kind,
            "size_bytes": d.size_bytes,
            "read_only": d.read_only,
            "volume": d.volume_name or d.nomad_volume or (d.ceph.label if d.ceph else ""),
        }
        for i, d in enumerate(plan.vm.disks)
    ]
    return {
        "backend": plan.backend.name,
        "vmm_version": plan.vm_plan.vmm_version,
        "accelerator": plan.vm_plan.accelerator.name,
        "arch": request.arch,
        "machine": request.machine,
        "firmware": request.firmware,
        "vcpus": request.vcpus,
        "memory_mb": request.memory_mb,
        "memory_max_mb": request.memory_max_mb,
        "hugepages": request.hugepages,
        "free_page_reporting": request.free_page_reporting,
        "kernel": _identity(plan.files.kernel),
        "initramfs": _identity(plan.files.initramfs),
        "cmdline": request.cmdline,
        "disks": disks,
        "seed": plan.seed is not None or bool(plan.seed_files),
        "shares": sorted(s.tag for s in plan.vm_plan.shares),
        "nics": 0 if plan.network is None else 1,
        "nic_model": request.nic_model,
        "display": request.display,
        "tpm": request.tpm,
        "hyperv": request.hyperv,
        "rtc_localtime": request.rtc_localtime,
        "seed_cdrom": request.seed_cdrom,
    }


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two machine records, each named: ``memory_mb: 256 then, 384 now``."""
    keys = sorted(set(saved) | set(now))
    return [
        f"{key}: {_shown(saved.get(key))} then, {_shown(now.get(key))} now"
        for key in keys
        if saved.get(key) != now.get(key)
    ]


def _shown(value: object) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def state_files(plan: StartPlan) -> list[str]:
    """The runtime directory's files that hold the machine's state besides its memory."""
    names = [d.file_name(i) for i, d in enumerate(plan.vm.disks) if d.in_file]
    if plan.vm_plan.request.firmware.startswith("uefi"):
        names.append(VARS_FILE)
    return names


def arm(plan: StartPlan) -> None:
    """Note in the runtime directory what a snapshot of this start saves, and whether its
    stop saves one (``snapshot_on_stop``); nothing for a backend without snapshots."""
    if not plan.backend.capabilities.snapshot:
        return
    setup = {
        "machine": machine_record(plan),
        "files": state_files(plan),
        "on_stop": plan.vm.snapshot_on_stop,
    }
    path = plan.runtime_dir / SETUP_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(setup, out)
    except OSError as exc:
        # The VM runs regardless; it is only stopped as usual, and cannot be snapshotted.
        log.warning("cannot record the snapshot setup of %s: %s", plan.task.id, exc)


def armed(runtime_dir: Path) -> dict[str, Any] | None:
    """The setup ``arm`` wrote; None for a VM that cannot be saved."""
    try:
        data = json.loads((runtime_dir / SETUP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Found:
    restore: Restore | None
    # Why a snapshot was refused (it is removed); None when there was none or it is used.
    refused: str | None = None


def find_restore(plan: StartPlan, key: Callable[[], bytes]) -> Found:
    """The task's snapshot, if one matches the machine the task asks for now and carries the
    seal of this node's plugin (``snapshot_seal``, ``key``); a refused one is removed (and why
    is said in ``refused``)."""
    task_dir = Path(plan.task.task_dir)
    fd = store.open_snapshot(task_dir)
    if fd is None:
        return Found(None)
    try:
        record = _load_record(fd)
        if not plan.backend.capabilities.snapshot:
            problems = [f"the {plan.backend.name} hypervisor cannot resume snapshots"]
        else:
            problems = differences(record["machine"], machine_record(plan))
        if problems:
            os.close(fd)
            store.remove_snapshot(task_dir)
            return Found(
                None, "the task's machine differs from the one saved: " + "; ".join(problems)
            )
        sealing.check(record, fd, key())
        files = tuple(str(name) for name in record["files"])
        return Found(Restore(fd, files, float(record["saved_at"]), int(record["state_bytes"])))
    except (HypervisorError, OSError, ValueError, KeyError, TypeError) as exc:
        os.close(fd)
        store.remove_snapshot(task_dir)
        return Found(None, f"it cannot be used: {exc}")


def _load_record(dir_fd: int) -> dict[str, Any]:
    fd = store.open_file(dir_fd, store.RECORD_FILE)
    with os.fdopen(fd) as source:
        record = json.load(source)
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise ValueError("unknown record version")
    return record


def open_state(restore: Restore) -> int:
    return store.open_file(restore.dir_fd, store.STATE_FILE)


def restored_event(restore: Restore) -> str:
    saved = datetime.fromtimestamp(restore.saved_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"VM restored from snapshot saved {saved} ({restore.state_bytes // (1 << 20)} MB of "
        "memory): it continues where it was; the snapshot is removed"
    )


def consume(restore: Restore, task_dir: Path) -> None:
    """A snapshot is used once: after the resume (or a failed one) it is gone."""
    restore.close()
    store.remove_snapshot(task_dir)


async def save(
    vm: RunningVM,
    task_dir: Path,
    runtime_dir: Path,
    setup: dict[str, Any],
    *,
    keep_running: bool,
    key: Callable[[], bytes],
) -> int:
    """Save the VM's state and its files into the task's snapshot directory; the bytes of
    memory state. The VM is paused for it; with ``keep_running`` its files are copied and it
    runs again afterwards (also after a failure), else they are moved and the VM stays stopped
    (the caller ends the VMM, or resumes it after a failure). A half-saved snapshot is removed;
    the previous one stays until a new one is complete."""
    was_paused = await vm.is_paused()
    if not was_paused:
        await vm.pause()
    dir_fd = await asyncio.to_thread(store.begin_snapshot, task_dir)
    try:
        state = store.create_file(dir_fd, store.STATE_FILE)
        try:
            state_bytes = await vm.save_state(state, SAVE_TIMEOUT)
            await asyncio.to_thread(os.fsync, state)
        finally:
            os.close(state)
        wanted = [str(name) for name in setup["files"]]
        files = await asyncio.to_thread(_take_files, runtime_dir, dir_fd, wanted, keep_running)
        record = {
            "version": RECORD_VERSION,
            "machine": setup["machine"],
            "files": files,
            "saved_at": time.time(),
            "state_bytes": state_bytes,
        }
        names = [store.STATE_FILE, *files]
        record = await asyncio.to_thread(sealing.seal, record, dir_fd, names, key())
        await asyncio.to_thread(_write_record, dir_fd, record)
        await asyncio.to_thread(store.commit_snapshot, task_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            store.remove_partial(task_dir)
        if keep_running and not was_paused:
            with contextlib.suppress(HypervisorError):
                await vm.resume()
        raise
    finally:
        os.close(dir_fd)
    if keep_running and not was_paused:
        await vm.resume()
    return state_bytes


def _take_files(runtime_dir: Path, dir_fd: int, files: list[str], keep: bool) -> list[str]:
    """Move (or copy) ``files`` from the runtime directory into the snapshot; the names
    there were (a UEFI variable store exists only once the firmware was prepared)."""
    source = store.open_dir(runtime_dir)
    taken = []
    try:
        for name in files:
            try:
                os.stat(name, dir_fd=source, follow_symlinks=False)
            except FileNotFoundError:
                continue
            store.move_file(source, dir_fd, name, keep=keep)
            store.make_private(dir_fd, name)
            taken.append(name)
    finally:
        os.close(source)
    return taken


def _write_record(dir_fd: int, record: dict[str, Any]) -> None:
    fd = store.create_file(dir_fd, store.RECORD_FILE)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
        out.flush()
        os.fsync(out.fileno())

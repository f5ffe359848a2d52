"""A task's journal: every host change its start made, recorded before it was made.

One record per task, the only one: the file a plugin finds by task id alone
(``journal_store``), and the ``driver_state`` bytes Nomad keeps in the task's handle (the same
encoding). It says, in the order StartTask makes them:

* the runtime directory (sockets, logs, the task's disk, seed and UEFI variables live in it);
* the files made in it (disk, seed, UEFI variable store), each before it is created, and
  the in-progress files of storage pool volumes;
* the pool volumes the task made or used, and its TPM's state directory, which the replay
  leaves in place;
* its leases on images in the node's image cache (``storage.image_store``), each recorded
  before it is taken, which the replay releases;
* the RBD images and snapshots it made in Ceph pools and does not keep (``rbd``), each before
  it is made: its own disks, the in-progress names of volumes and imports, the snapshots its
  clones hang from;
* the network (bridge port, lease, TAP, forwards, DHCP host) as ``NetworkRecord``;
* its cgroup's directories (``nomad_vm.vm.cgroups``), before they are made;
* every process (helpers such as virtiofsd, then the VMM) by pid, start ticks and boot id,
  recorded between fork and exec (``nomad_vm.vm.process``: a process runs only once recorded),
  with the VMM's control socket: from then on the VM can be reattached.

Replaying it (``replay.undo_host_changes``) removes all of that, whether the start failed, the
task is destroyed, or a plugin died in the middle of StartTask and a fresh one is asked to
destroy a task it never heard of. Encoded as msgpack with string keys (``nomad operator
client-state`` can show it); ``version`` lets a newer plugin read an older record, including
the ``DriverState`` of plugins before the journal (version 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack

from nomad_vm.driver.network_plan import NetworkRecord
from nomad_vm.errors import HypervisorError
from nomad_vm.processes import ProcessIdentity, identity_from_legacy
from nomad_vm.vm.hypervisor import VMM_ROLE, VMRef

JOURNAL_VERSION = 2
LEGACY_VERSION = 1
LEGACY_HELPER_ROLE = "helper"


@dataclass(frozen=True)
class RecordedProcess:
    role: str
    ident: ProcessIdentity


@dataclass(frozen=True)
class RbdRecord:
    """An RBD image (or, with ``snapshot``, one of its snapshots) in the Ceph pool
    configured as ``pool`` (its `storage_pools` name: the credentials stay in the config)."""

    pool: str
    image: str
    snapshot: str = ""

    def __str__(self) -> str:
        return f"{self.pool}:{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")


@dataclass(frozen=True)
class TaskJournal:
    task_id: str
    backend: str
    # Wall-clock time of the start, for Nomad's "started at" only (identity uses start ticks).
    started_at: float
    runtime_dir: str = ""
    files: tuple[str, ...] = ()
    network: NetworkRecord | None = None
    processes: tuple[RecordedProcess, ...] = ()
    # Where the VMM answers (recorded with the processes): the VM can be reattached.
    control_socket: str = ""
    # Where `nomad alloc signal` goes in the guest (task options: Nomad does not hand the job's
    # config back after an agent restart, so they are kept here).
    signal_unit: str | None = None
    signal_pidfile: str | None = None
    # Storage pool volumes (and Nomad volumes' disks) the task made or used, and the TPM's
    # state directory (driver/tpm_state.py): they outlive it, so the replay leaves them
    # (recorded to say where the task's data is; their in-progress files are in ``files``).
    volumes: tuple[str, ...] = ()
    # Lease files on cached images (images given by URL): released by the replay.
    image_leases: tuple[str, ...] = ()
    # RBD images and snapshots the task made and does not keep: the replay removes them,
    # newest first (a clone before the snapshot it hangs from).
    rbd: tuple[RbdRecord, ...] = ()
    # The task's cgroup directories (one per v1 controller, or one v2 directory): removed by
    # the replay once its processes are gone; a reattached VM keeps them.
    cgroups: tuple[str, ...] = ()
    version: int = field(default=JOURNAL_VERSION)

    # -- what the journal says -------------------------------------------------------------

    @property
    def vmm(self) -> ProcessIdentity | None:
        return next((p.ident for p in self.processes if p.role == VMM_ROLE), None)

    @property
    def helpers(self) -> tuple[ProcessIdentity, ...]:
        return tuple(p.ident for p in self.processes if p.role != VMM_ROLE)

    def vm_ref(self) -> VMRef | None:
        """How the backend finds the VM again; None when its start never got to the VMM."""
        vmm = self.vmm
        if vmm is None or not self.control_socket:
            return None
        return VMRef(vmm, Path(self.control_socket), Path(self.runtime_dir), self.helpers)

    # -- new entries (each returns the journal with it) ------------------------------------

    def with_file(self, path: Path) -> TaskJournal:
        return replace(self, files=(*self.files, str(path)))

    def with_volume(self, path: Path) -> TaskJournal:
        return replace(self, volumes=(*self.volumes, str(path)))

    def with_image_lease(self, path: Path) -> TaskJournal:
        return replace(self, image_leases=(*self.image_leases, str(path)))
    def with_rbd(self, record: RbdRecord) -> TaskJournal:
        return replace(self, rbd=(*self.rbd, record))

    def with_processes(self, added: tuple[RecordedProcess, ...]) -> TaskJournal:
        return replace(self, processes=(*self.processes, *added))

    # -- encoding ------------------------------------------------------------------------------

    def encode(self) -> bytes:
        raw: dict[str, Any] = {
            "version": self.version,
            "task_id": self.task_id,
            "backend": self.backend,
            "started_at": self.started_at,
            "runtime_dir": self.runtime_dir,
            "files": list(self.files),
            "network": self.network.to_dict() if self.network is not None else None,
            "processes": [{"role": p.role, **p.ident.to_dict()} for p in self.processes],
            "control_socket": self.control_socket,
            "signal_unit": self.signal_unit,
            "signal_pidfile": self.signal_pidfile,
            "volumes": list(self.volumes),
            "image_leases": list(self.image_leases),
            "rbd": [[r.pool, r.image, r.snapshot] for r in self.rbd],
            "cgroups": list(self.cgroups),
        }
        packed: bytes = msgpack.packb(raw, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> TaskJournal:
        """HypervisorError when ``data`` is not a journal this plugin can read."""
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise HypervisorError(f"task journal is not valid msgpack: {exc}") from exc
        if not isinstance(raw, dict):
            raise HypervisorError("task journal is not a map")
        version = raw.get("version")
        try:
            if version == JOURNAL_VERSION:
                return _from_dict(raw)
            if version == LEGACY_VERSION:
                return _from_legacy(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise HypervisorError(f"task journal (version {version}) is damaged: {exc}") from exc
        raise HypervisorError(
            f"task journal version {version!r} is not supported by this plugin "
            f"(it reads versions {LEGACY_VERSION} and {JOURNAL_VERSION})"
        )


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _from_dict(raw: Mapping[str, Any]) -> TaskJournal:
    network = raw["network"]
    return TaskJournal(
        task_id=str(raw["task_id"]),
        backend=str(raw["backend"]),
        started_at=float(raw["started_at"]),
        runtime_dir=str(raw["runtime_dir"]),
        files=tuple(str(f) for f in raw["files"]),
        network=NetworkRecord.from_dict(network) if network is not None else None,
        processes=tuple(
            RecordedProcess(str(p["role"]), ProcessIdentity.from_dict(p)) for p in raw["processes"]
        ),
        control_socket=str(raw["control_socket"]),
        signal_unit=_optional_str(raw["signal_unit"]),
        signal_pidfile=_optional_str(raw["signal_pidfile"]),
        # Absent from records of plugins before storage pools.
        volumes=tuple(str(v) for v in raw.get("volumes", ())),
        # Absent from records of plugins before the image cache.
        image_leases=tuple(str(v) for v in raw.get("image_leases", ())),
        # Absent from records of plugins before Ceph pools.
        rbd=tuple(RbdRecord(str(p), str(i), str(s)) for p, i, s in raw.get("rbd", ())),
        # Absent from records of plugins before cgroups.
        cgroups=tuple(str(c) for c in raw.get("cgroups", ())),
    )


def _from_legacy(raw: Mapping[str, Any]) -> TaskJournal:
    """The DriverState of plugins before the journal: pid + wall-clock start times. A process
    that no longer matches its record as those plugins checked it is left out (it is gone)."""
    processes = []
    vmm = identity_from_legacy(int(raw["pid"]), float(raw["process_start_time"]))
    if vmm is not None:
        processes.append(RecordedProcess(VMM_ROLE, vmm))
    for pid, start in raw.get("helper_processes", ()):
        helper = identity_from_legacy(int(pid), float(start))
        if helper is not None:
            processes.append(RecordedProcess(LEGACY_HELPER_ROLE, helper))
    network = raw.get("network")
    return TaskJournal(
        task_id=str(raw["task_id"]),
        backend=str(raw["backend"]),
        started_at=float(raw["started_at"]),
        runtime_dir=str(raw["runtime_dir"]),
        network=NetworkRecord.from_dict(network) if network is not None else None,
        processes=tuple(processes),
        control_socket=str(raw["control_socket"]),
        signal_unit=_optional_str(raw.get("signal_unit")),
        signal_pidfile=_optional_str(raw.get("signal_pidfile")),
    )

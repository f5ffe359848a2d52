"""The journal of one StartTask as it happens: each host change is saved before it is made,
and the step's checkpoint follows (``checkpoints``). It is also the ``LaunchRecorder`` a
backend's launch reports its own files and processes to."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from nomad_vm.driver.checkpoints import Checkpoints
from nomad_vm.driver.journal import RbdRecord, RecordedProcess, TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.network_plan import NetworkRecord
from nomad_vm.errors import LaunchError
from nomad_vm.vm.cgroups import CgroupError, CgroupLimits, TaskCgroup
from nomad_vm.vm.hypervisor import VMM_ROLE, SpawnedProcess


class TaskRecorder:
    def __init__(self, store: JournalStore, journal: TaskJournal, checkpoints: Checkpoints) -> None:
        self.store = store
        self.journal = journal
        self.checkpoints = checkpoints
        # The task's cgroup once made: every process spawned after it is moved in at its gate.
        self.cgroup: TaskCgroup | None = None

    def _save(self, journal: TaskJournal, *, durable: bool = True) -> None:
        if journal == self.journal and self.store.path_for(journal.task_id).exists():
            return  # already on record (e.g. the network record, again from its setup)
        self.store.save(journal, durable=durable)
        self.journal = journal

    async def _reached(self, step: str) -> None:
        await self.checkpoints.reached(step, self.journal.task_id)

    async def runtime_dir(self, path: Path, planned: tuple[Path, ...] = ()) -> None:
        """The first entry: the journal itself comes into being with it. ``planned`` are files
        the start will make in it (disk, seed): recorded now, in the same write, since each
        write costs a file and a directory fsync on StartTask's path."""
        journal = replace(self.journal, runtime_dir=str(path))
        for file in planned:
            journal = journal.with_file(file)
        self._save(journal)
        await self._reached("runtime-dir")

    async def creating(self, what: str, path: Path) -> None:
        if str(path) not in self.journal.files:
            self._save(self.journal.with_file(path))
        await self._reached(what)

    def volume(self, path: Path) -> None:
        """A storage pool volume, a Nomad volume's disk or the TPM's state directory the task
        uses: on record, kept by the replay."""
        if str(path) not in self.journal.volumes:
            self._save(self.journal.with_volume(path))

    async def image_lease(self, path: Path) -> None:
        """A lease on a cached image, on record before it is taken (the replay releases it);
        part of the disk step (its checkpoint is the disk's)."""
        if str(path) not in self.journal.image_leases:
            self._save(self.journal.with_image_lease(path))
        await self._reached("disk")

    async def creating_rbd(self, record: RbdRecord) -> None:
        """An RBD image or snapshot the task is about to make (removed by the replay)."""
        if record not in self.journal.rbd:
            self._save(self.journal.with_rbd(record))
        await self._reached("disk")

    def volume_name(self, name: str) -> None:
        """A kept volume that is not a path (an RBD image, `ceph:<pool>/<image>`)."""
        if name not in self.journal.volumes:
            self._save(replace(self.journal, volumes=(*self.journal.volumes, name)))

    async def network(self, record: NetworkRecord) -> None:
        self.record_network(record)
        await self._reached("network")

    def record_network(self, record: NetworkRecord) -> None:
        """Also called by the network setup (in its thread) as the record grows (the lease)."""
        self._save(replace(self.journal, network=record))

    async def make_cgroup(self, cgroup: TaskCgroup, limits: CgroupLimits) -> None:
        """Record the task's cgroup directories, then make them with the task's limits."""
        paths = tuple(str(p) for p in cgroup.paths)
        if paths != self.journal.cgroups:
            self._save(replace(self.journal, cgroups=paths))
        await self._reached("cgroup")
        try:
            await asyncio.to_thread(cgroup.create, limits)
        except CgroupError as exc:
            raise LaunchError(f"{exc} (set the plugin's `cgroups = false` where the plugin "
                              "may not manage cgroups)") from exc  # fmt: skip
        self.cgroup = cgroup

    async def spawned(
        self, processes: Sequence[SpawnedProcess], control_socket: Path | None = None
    ) -> None:
        """Checkpoints ``vmm-spawned``/``vmm-recorded`` when the VMM is among them, else
        ``helpers-spawned``/``helpers-recorded``."""
        what = "vmm" if any(p.role == VMM_ROLE for p in processes) else "helpers"
        await self._reached(f"{what}-spawned")
        journal = self.journal.with_processes(
            tuple(RecordedProcess(p.role, p.ident) for p in processes)
        )
        if control_socket is not None:
            journal = replace(journal, control_socket=str(control_socket))
        # No fsync: processes do not outlive a host crash that would lose this write.
        self._save(journal, durable=False)
        await self._reached(f"{what}-recorded")
        if self.cgroup is not None:
            # Still at their gates: the programs (and every thread they start) run in it. In a
            # thread: a v1 attach waits for an RCU grace period (milliseconds).
            for process in processes:
                try:
                    await asyncio.to_thread(self.cgroup.add, process.ident.pid)
                except CgroupError as exc:
                    raise LaunchError(str(exc)) from exc

    async def started(self) -> None:
        """The VMM answered; StartTask answers Nomad next (nothing more to record)."""
        await self._reached("started")

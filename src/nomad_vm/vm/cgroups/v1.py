"""cgroup v1: the task's cgroup is a directory in each of the cpu, cpuset and memory
hierarchies (``/sys/fs/cgroup/<controller>/nomad-vm/<task>``), as on hybrid hosts."""

from __future__ import annotations

from pathlib import Path

from nomad_vm.vm.cgroups import (
    PARENT_NAME,
    CgroupLimits,
    create_retrying,
    make_dir,
    read,
    write,
)

CONTROLLERS = ("cpu", "cpuset", "memory")


class V1Cgroup:
    version = "v1"

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name

    def _dir(self, controller: str) -> Path:
        return self.root / controller / PARENT_NAME / self.name

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self._dir(c) for c in CONTROLLERS)

    def create(self, limits: CgroupLimits) -> None:
        create_retrying(lambda: self._create(limits))

    def _create(self, limits: CgroupLimits) -> None:
        for controller in CONTROLLERS:
            make_dir(self._dir(controller).parent)
        # A new v1 cpuset starts with no cores and no memory nodes, and no process may join
        # it so: the parent takes its hierarchy root's (all the node's), the task the same or
        # its reserved cores.
        cpuset_root = self.root / "cpuset"
        parent = cpuset_root / PARENT_NAME
        for key in ("cpuset.cpus", "cpuset.mems"):
            if not read(parent / key):
                write(parent / key, read(cpuset_root / key))
        for controller in CONTROLLERS:
            make_dir(self._dir(controller))
        cpuset = self._dir("cpuset")
        write(cpuset / "cpuset.cpus", limits.cpus or read(parent / "cpuset.cpus"))
        write(cpuset / "cpuset.mems", read(parent / "cpuset.mems"))
        write(self._dir("cpu") / "cpu.shares", str(limits.cpu_shares))
        write(self._dir("memory") / "memory.limit_in_bytes", str(limits.memory_bytes))

    def add(self, pid: int) -> None:
        for path in self.paths:
            write(path / "cgroup.procs", str(pid))

"""cgroup v2: the task's cgroup is one directory, ``/sys/fs/cgroup/nomad-vm/<task>``, with the
cpu, cpuset and memory controllers enabled down to it."""

from __future__ import annotations

from pathlib import Path

from nomad_vm.vm.cgroups import (
    PARENT_NAME,
    CgroupError,
    CgroupLimits,
    create_retrying,
    make_dir,
    read,
    shares_to_weight,
    write,
)

CONTROLLERS = ("cpu", "cpuset", "memory")


class V2Cgroup:
    version = "v2"

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name

    @property
    def path(self) -> Path:
        return self.root / PARENT_NAME / self.name

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def create(self, limits: CgroupLimits) -> None:
        create_retrying(lambda: self._create(limits))

    def _create(self, limits: CgroupLimits) -> None:
        parent = self.path.parent
        available = read(self.root / "cgroup.controllers").split()
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"the cgroup v2 root {self.root} lacks the {', '.join(missing)} controller(s)"
            )
        # v2's "no internal processes" rule: controllers are enabled for children only, so
        # the root and our parent both hand them down (the root's may already).
        _enable(self.root)
        make_dir(parent)
        _enable(parent)
        make_dir(self.path)
        write(self.path / "cpu.weight", str(shares_to_weight(limits.cpu_shares)))
        # Empty cpuset.cpus means the parent's cores: only reserved cores are written.
        if limits.cpus:
            write(self.path / "cpuset.cpus", limits.cpus)
        write(self.path / "memory.max", str(limits.memory_bytes))

    def add(self, pid: int) -> None:
        write(self.path / "cgroup.procs", str(pid))


def _enable(directory: Path) -> None:
    enabled = read(directory / "cgroup.subtree_control").split()
    wanted = [c for c in CONTROLLERS if c not in enabled]
    if wanted:
        write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

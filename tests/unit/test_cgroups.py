"""The task's cgroup on fake cgroup trees (directories in tmp_path laid out as the kernel lays
out v1 hierarchies and the v2 tree): which files are written with which values, the v2 weight
conversion, the limits, detection, removal, and the journal coming first."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.driver.cgroup_plan import cgroup_attribute, plan_cgroup
from nomad_vm.driver.checkpoints import NoCheckpoints
from nomad_vm.driver.config import PluginConfig
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.errors import LaunchError
from nomad_vm.processes import identity_of
from nomad_vm.vm.cgroups import (
    PARENT_NAME,
    CgroupError,
    CgroupLimits,
    cgroup_name,
    create_retrying,
    detect,
    limits_for,
    nomad_shared_cores,
    remove_cgroup_dirs,
    scope_tag,
    shares_to_weight,
    task_cgroup,
    vmm_overhead_mb,
)
from nomad_vm.vm.hypervisor import VMM_ROLE, SpawnedProcess

MB = 1024 * 1024


def v1_tree(root: Path, cpus: str = "0-3") -> Path:
    """A hybrid host: v1 cpu, cpuset, memory (and an empty unified v2 mount beside them). The
    plugin's parent cpuset exists with no cores, as a fresh v1 cpuset does."""
    for controller in ("cpu", "cpuset", "memory"):
        (root / controller / PARENT_NAME).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    (root / "cpuset" / "cpuset.cpus").write_text(f"{cpus}\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    for key in ("cpuset.cpus", "cpuset.mems"):
        (root / "cpuset" / PARENT_NAME / key).write_text("\n")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    return root


def v2_tree(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / PARENT_NAME).mkdir()
    (root / PARENT_NAME / "cgroup.subtree_control").write_text("\n")
    return root


def test_v1_writes_shares_cores_mems_and_the_memory_limit(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    cgroup = task_cgroup("alloc/web/1a2b", "/var/lib/nomad-vm", root)
    assert cgroup.version == "v1"
    name = cgroup_name("alloc/web/1a2b", "/var/lib/nomad-vm")
    assert cgroup.paths == tuple(root / c / PARENT_NAME / name for c in ("cpu", "cpuset", "memory"))
    cgroup.create(CgroupLimits(cpu_shares=500, cpus="2", memory_bytes=300 * MB))
    cpu, cpuset, memory = cgroup.paths
    assert (cpu / "cpu.shares").read_text() == "500"
    assert (cpuset / "cpuset.cpus").read_text() == "2"
    assert (cpuset / "cpuset.mems").read_text() == "0"
    assert (memory / "memory.limit_in_bytes").read_text() == str(300 * MB)
    # The parent cpuset got the node's cores and memory nodes, so that children may join.
    assert (root / "cpuset" / PARENT_NAME / "cpuset.cpus").read_text() == "0-3"
    assert (root / "cpuset" / PARENT_NAME / "cpuset.mems").read_text() == "0"
    cgroup.add(4242)
    assert all((p / "cgroup.procs").read_text() == "4242" for p in cgroup.paths)


def test_v1_without_reserved_cores_takes_the_parents(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, cpus="0-1")
    cgroup = task_cgroup("t", "", root)
    cgroup.create(CgroupLimits(cpu_shares=100, cpus="", memory_bytes=MB))
    assert (cgroup.paths[1] / "cpuset.cpus").read_text() == "0-1"


def test_v2_writes_the_converted_weight_and_enables_controllers(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "cg")
    cgroup = task_cgroup("alloc/web/1a2b", "", root)
    assert cgroup.version == "v2"
    (path,) = cgroup.paths
    assert path == root / PARENT_NAME / cgroup_name("alloc/web/1a2b")
    cgroup.create(CgroupLimits(cpu_shares=1024, cpus="0-1", memory_bytes=512 * MB))
    assert (path / "cpu.weight").read_text() == "39"
    assert (path / "cpuset.cpus").read_text() == "0-1"
    assert (path / "memory.max").read_text() == str(512 * MB)
    for directory in (root, root / PARENT_NAME):
        assert (directory / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    cgroup.add(77)
    assert (path / "cgroup.procs").read_text() == "77"


def test_v2_without_reserved_cores_leaves_the_cpuset_to_the_parent(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "cg")
    cgroup = task_cgroup("t", "", root)
    cgroup.create(CgroupLimits(cpu_shares=1024, cpus="", memory_bytes=MB))
    assert not (cgroup.paths[0] / "cpuset.cpus").exists()


def test_v2_without_a_controller_says_which(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "cg", controllers="cpu io pids")
    with pytest.raises(CgroupError, match="lacks the cpuset, memory controller"):
        task_cgroup("t", "", root).create(CgroupLimits(1024, "", MB))


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(2, 1), (1024, 39), (262144, 10000), (1, 1), (10**9, 10000), (100, 4), (26214, 1000)],
)
def test_shares_to_weight_is_systemds_linear_map(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_limits_memory_max_wins_and_the_overhead_is_added() -> None:
    assert vmm_overhead_mb(256) == 256 + 16
    assert limits_for(500, 256, 0, "") == CgroupLimits(500, "", (256 + 272) * MB)
    assert limits_for(500, 256, 1024, "3").memory_bytes == (1024 + 256 + 64) * MB
    # TCG's translation cache (QEMU's default 1 GiB) is the VMM's too.
    assert limits_for(500, 256, 0, "", tcg=True).memory_bytes == (256 + 272 + 1024) * MB
    # cpu.shares has a floor of 2 in the kernel.
    assert limits_for(0, 256, 0, "").cpu_shares == 2


def test_detect_each_layout(tmp_path: Path) -> None:
    assert detect(v1_tree(tmp_path / "hybrid")) == "v1"
    assert detect(v2_tree(tmp_path / "unified")) == "v2"
    (tmp_path / "empty").mkdir()
    assert detect(tmp_path / "empty") is None
    with pytest.raises(CgroupError, match="no cgroup file system"):
        task_cgroup("t", "", tmp_path / "empty")


def test_names_differ_by_task_and_by_plugin() -> None:
    assert cgroup_name("a/t/1") != cgroup_name("a/t/2")
    assert cgroup_name("a/t/1", "/var/lib/nomad-vm") != cgroup_name("a/t/1", "/var/lib/other")
    assert "/" not in cgroup_name("a/t/1")


def test_a_name_starts_with_its_plugins_tag() -> None:
    """The tag says which plugin (data_dir) made a cgroup: two installed names on one node."""
    name = cgroup_name("a/t/1", "/var/lib/nomad-vm")
    assert name.startswith(scope_tag("/var/lib/nomad-vm") + "-")
    assert not name.startswith(scope_tag("/var/lib/other"))


def test_removal_takes_the_parent_only_when_no_other_task_is_in_it(tmp_path: Path) -> None:
    parent = tmp_path / PARENT_NAME
    mine, other = parent / "mine", parent / "other"
    mine.mkdir(parents=True)
    other.mkdir()
    never_made = str(parent / "never")
    assert remove_cgroup_dirs((str(mine), never_made)) == []
    assert not mine.exists() and other.exists()
    assert remove_cgroup_dirs((str(other),)) == []
    assert not parent.exists()


def test_removal_reports_what_it_cannot_remove(tmp_path: Path) -> None:
    busy = tmp_path / PARENT_NAME / "busy"
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("1")  # a real cgroup with processes refuses rmdir too
    (failure,) = remove_cgroup_dirs((str(busy),))
    assert f"cannot remove cgroup {busy}" in failure


class OrderCheckingCgroup:
    """Fault injection: a cgroup that checks the journal has it on record before it is made,
    and can refuse to take a process."""

    version = "v1"

    def __init__(self, store: JournalStore, task_id: str, path: Path, refuse: bool) -> None:
        self.store, self.task_id, self.path, self.refuse = store, task_id, path, refuse
        self.added: list[int] = []

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def create(self, limits: CgroupLimits) -> None:
        on_record = TaskJournal.decode(self.store.path_for(self.task_id).read_bytes())
        assert on_record.cgroups == (str(self.path),)
        self.path.mkdir()

    def add(self, pid: int) -> None:
        if self.refuse:
            raise CgroupError(f"cannot write {pid!r} to {self.path}/cgroup.procs: No space")
        self.added.append(pid)


@pytest.mark.parametrize("refuse", [False, True])
def test_recorder_records_first_and_places_spawned_processes(tmp_path: Path, refuse: bool) -> None:
    store = JournalStore(tmp_path / "data")
    recorder = TaskRecorder(store, TaskJournal("t", "qemu", 1.0), NoCheckpoints())
    cgroup = OrderCheckingCgroup(store, "t", tmp_path / "cg", refuse)
    me = identity_of(os.getpid())
    assert me is not None

    async def start() -> None:
        await recorder.runtime_dir(tmp_path / "run")
        await recorder.make_cgroup(cgroup, CgroupLimits(2, "", MB))
        await recorder.spawned([SpawnedProcess(VMM_ROLE, me)])

    if refuse:
        with pytest.raises(LaunchError, match=r"cgroup\.procs"):
            asyncio.run(start())
    else:
        asyncio.run(start())
        assert cgroup.added == [me.pid]
    assert recorder.journal.cgroups == (str(tmp_path / "cg"),)


def test_a_cgroup_the_kernel_refuses_fails_the_start_naming_the_option(tmp_path: Path) -> None:
    """A v2 tree without the memory controller (a delegated subtree, say): the start fails
    with the reason and the plugin option that turns cgroups off; the journal already names
    the directory, so the replay removes whatever was made."""
    root = v2_tree(tmp_path / "cg", controllers="cpu cpuset")
    store = JournalStore(tmp_path / "data")
    recorder = TaskRecorder(store, TaskJournal("t", "qemu", 1.0), NoCheckpoints())
    cgroup = task_cgroup("t", "", root)

    async def start() -> None:
        await recorder.runtime_dir(tmp_path / "run")
        await recorder.make_cgroup(cgroup, CgroupLimits(2, "", MB))

    with pytest.raises(LaunchError, match=r"lacks the memory controller.*`cgroups = false`"):
        asyncio.run(start())
    assert recorder.journal.cgroups == tuple(map(str, cgroup.paths))
    assert recorder.cgroup is None


def test_unreserved_tasks_take_nomads_shared_cores(tmp_path: Path) -> None:
    root = v1_tree(tmp_path / "v1")
    plugin = PluginConfig(Path("/var/lib/nomad-vm"), (), "auto", "qemu-system-x86_64")
    task = TaskConfig("a/t/1", "t", "a", "/a", "/o", "/e", TaskResources(500, 256), None)
    plan = plan_cgroup(task, plugin, tcg=False, root=root)
    assert plan is not None and plan.limits.cpus == ""  # no Nomad partition: the parent's
    shared = root / "cpuset" / "nomad" / "share"
    shared.mkdir(parents=True)
    (shared / "cpuset.cpus").write_text("0,2-3\n")
    plan = plan_cgroup(task, plugin, tcg=False, root=root)
    assert plan is not None and plan.limits.cpus == "0,2-3"
    reserved = replace(task, resources=TaskResources(500, 256, cpuset_cpus="1"))
    plan = plan_cgroup(reserved, plugin, tcg=False, root=root)
    assert plan is not None and plan.limits.cpus == "1"
    v2 = v2_tree(tmp_path / "v2")
    (v2 / "nomad.slice" / "share.slice").mkdir(parents=True)
    (v2 / "nomad.slice" / "share.slice" / "cpuset.cpus").write_text("2-3\n")
    assert nomad_shared_cores(v2, "v2") == "2-3"
    assert plan_cgroup(task, replace(plugin, cgroups=False), tcg=False, root=root) is None
    (tmp_path / "none").mkdir()
    assert plan_cgroup(task, plugin, tcg=False, root=tmp_path / "none") is None


def test_a_parent_that_vanished_under_the_start_is_made_again() -> None:
    calls: list[int] = []

    def make() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise CgroupError("cannot create cgroup x: No such file or directory", vanished=True)

    create_retrying(make)
    assert len(calls) == 2
    with pytest.raises(CgroupError, match="Permission"):
        create_retrying(lambda: (_ for _ in ()).throw(CgroupError("Permission denied")))


def test_the_fingerprint_word_for_each_host(tmp_path: Path) -> None:
    plugin = PluginConfig(Path("/var/lib/nomad-vm"), (), "auto", "qemu-system-x86_64")
    (tmp_path / "none").mkdir()
    assert cgroup_attribute(plugin, v1_tree(tmp_path / "v1")) == "v1"
    assert cgroup_attribute(plugin, v2_tree(tmp_path / "v2")) == "v2"
    assert cgroup_attribute(plugin, tmp_path / "none") == "none"
    assert cgroup_attribute(replace(plugin, cgroups=False), tmp_path / "v1") == "off"

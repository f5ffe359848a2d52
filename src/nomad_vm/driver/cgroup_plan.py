"""Whether a task gets a cgroup, and with which limits (decided at planning: the host's cgroup
layout is read then, the directories are made by the start steps, ``recorder.make_cgroup``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nomad_vm.driver.config import PluginConfig
from nomad_vm.driver.types import TaskConfig
from nomad_vm.vm.cgroups import (
    CGROUP_ROOT,
    CgroupLimits,
    TaskCgroup,
    detect,
    limits_for,
    nomad_shared_cores,
    task_cgroup,
)


@dataclass(frozen=True)
class CgroupPlan:
    cgroup: TaskCgroup
    limits: CgroupLimits


def plan_cgroup(
    task: TaskConfig, plugin: PluginConfig, tcg: bool, root: Path = CGROUP_ROOT
) -> CgroupPlan | None:
    """``tcg``: the VM runs under TCG (its translation cache counts). None when the plugin's
    `cgroups` is off, or the host has no cgroup file system (the fingerprint says so:
    `driver.vm.cgroups = "none"`)."""
    if not plugin.cgroups:
        return None
    version = detect(root)
    if version is None:
        return None
    res = task.resources
    # Unreserved: the cores Nomad shares among tasks, where its client made that partition.
    cores = res.cpuset_cpus or nomad_shared_cores(root, version)
    limits = limits_for(res.cpu_mhz, res.memory_mb, res.memory_max_mb, cores, tcg)
    return CgroupPlan(task_cgroup(task.id, str(plugin.data_dir), root, version), limits)


def cgroup_attribute(plugin: PluginConfig, root: Path = CGROUP_ROOT) -> str:
    """The fingerprint's word for it: "v1", "v2", "none" (no cgroup file system) or "off"."""
    if not plugin.cgroups:
        return "off"
    return detect(root) or "none"

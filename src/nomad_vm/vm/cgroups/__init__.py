"""The task's cgroup: where its VMM and helpers run, with the task's CPU weight, cores and
memory limit (cgroup v1 in ``v1``, v2 in ``v2``, one interface: ``TaskCgroup``).

Layout: the plugin's own ``nomad-vm/<data_dir tag>-<task hash>`` under the hierarchy's root (v1:
in each of the cpu, cpuset and memory hierarchies; v2: one directory). Not under Nomad's own
cgroup for the task: Nomad 1.11 sends drivers only a cpuset cgroup path (``cpuset_cgroup``),
made for its executor-based drivers, and on v1 only for the cpuset controller; a VM's limits
need cpu and memory too, so the plugin keeps one tree of its own that it alone creates and
removes (recorded in the task's journal before it exists, removed by the replay).

Values:

* CPU weight: the task's `cpu` (MHz) is its `cpu.shares` (v1), what the virt driver calls
  CpuShares and Nomad's own drivers write; v2's `cpu.weight` is converted the way systemd and
  runc do (``shares_to_weight``).
* cpuset: the task's reserved `cores`; without any, the cores of Nomad's own shared partition
  where the Nomad client made one (``nomad_shared_cores``: the node's cores minus those reserved
  by tasks), else the parent's (all the node's).
* memory: the guest's RAM (`memory_max` when set, else `memory`) plus the VMM's overhead
  (``vmm_overhead_mb``: 256 MB + 1/16 of guest RAM, + 1024 MB under TCG for its translation
  cache), so the limit stops a runaway VMM without squeezing the guest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The plugin's parent cgroup (in each v1 hierarchy, or in the v2 tree).
PARENT_NAME = "nomad-vm"

# cpu.shares' range in the kernel (v1) and cpu.weight's (v2).
MIN_SHARES, MAX_SHARES = 2, 262144
MIN_WEIGHT, MAX_WEIGHT = 1, 10000

# The VMM's own memory besides guest RAM: QEMU's code and libraries, its heap, device
# emulation buffers, VGA memory, firmware copies, page tables and dirty bitmaps for guest RAM
# (these grow with it). The README's "cgroups" section has the measurements behind it.
OVERHEAD_BASE_MB = 256
OVERHEAD_PER_GUEST_MB_DIVISOR = 16  # + 1/16 of guest RAM
# Under TCG, QEMU's translation cache: 1 GiB by default on 64-bit hosts (QEMU 7.2), mapped at
# start and filled as guest code is translated, so a long-running guest may use all of it.
TCG_CACHE_MB = 1024


def vmm_overhead_mb(guest_mb: int, tcg: bool = False) -> int:
    return (
        OVERHEAD_BASE_MB + guest_mb // OVERHEAD_PER_GUEST_MB_DIVISOR + (TCG_CACHE_MB if tcg else 0)
    )


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), linearly, as systemd and runc do:
    the default 1024 shares become weight 39 (not 100: that is what the same formula gives)."""
    shares = min(max(shares, MIN_SHARES), MAX_SHARES)
    return MIN_WEIGHT + ((shares - MIN_SHARES) * (MAX_WEIGHT - MIN_WEIGHT)) // (
        MAX_SHARES - MIN_SHARES
    )


@dataclass(frozen=True)
class CgroupLimits:
    cpu_shares: int
    # The cores as a cpuset list ("2" or "0-1"); "" for the parent's.
    cpus: str
    memory_bytes: int


def limits_for(
    cpu_mhz: int, memory_mb: int, memory_max_mb: int, cpus: str, tcg: bool = False
) -> CgroupLimits:
    guest_mb = max(memory_mb, memory_max_mb)
    shares = min(max(cpu_mhz, MIN_SHARES), MAX_SHARES)
    memory_mb_total = guest_mb + vmm_overhead_mb(guest_mb, tcg)
    return CgroupLimits(shares, cpus, memory_mb_total * 1024 * 1024)


def cgroup_name(task_id: str, scope: str = "") -> str:
    """``<scope tag>-<task hash>``. Nomad's task ids hold slashes ("alloc/task/hash"): a hash
    names the directory. ``scope`` (the plugin's data_dir) keeps two plugins on one node
    (installed under two names) apart, and its tag says which plugin a cgroup belongs to."""
    task_hash = hashlib.sha256(f"{scope}\0{task_id}".encode()).hexdigest()[:16]
    return f"{scope_tag(scope)}-{task_hash}"


def scope_tag(scope: str) -> str:
    """The prefix every task cgroup of the plugin whose data_dir is ``scope`` carries."""
    return hashlib.sha256(scope.encode()).hexdigest()[:8]


class CgroupError(Exception):
    """The cgroup cannot be made or used; the message names the file and the reason.
    ``vanished``: a directory disappeared meanwhile (another task removed the shared parent
    as it became empty): making it again is the remedy."""

    def __init__(self, message: str, vanished: bool = False) -> None:
        super().__init__(message)
        self.vanished = vanished


class TaskCgroup(Protocol):
    """One task's cgroup, in one cgroup version's layout."""

    # "v1" or "v2".
    version: str

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every directory it consists of (recorded before any is made)."""
        ...

    def create(self, limits: CgroupLimits) -> None:
        """Make the directories and write the limits; CgroupError when the kernel refuses."""

    def add(self, pid: int) -> None:
        """Move ``pid`` (a gated process, before its program runs) in; its threads follow."""


def write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(
            f"cannot write {value!r} to {path}: {exc.strerror or exc}",
            vanished=isinstance(exc, FileNotFoundError),
        ) from exc


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CgroupError(
            f"cannot read {path}: {exc.strerror or exc}",
            vanished=isinstance(exc, FileNotFoundError),
        ) from exc


def make_dir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupError(
            f"cannot create cgroup {path}: {exc.strerror or exc}",
            vanished=isinstance(exc, FileNotFoundError),
        ) from exc


def create_retrying(make: Callable[[], None]) -> None:
    """``make`` once more if the shared parent vanished under it (another task's replay
    removed it the moment it was empty); a second time is not a race but a broken tree."""
    try:
        make()
    except CgroupError as exc:
        if not exc.vanished:
            raise
        make()


def nomad_shared_cores(root: Path, version: str) -> str:
    """The cores of the Nomad client's shared partition ("" where there is none): Nomad 1.7+
    keeps the cores no task reserved in ``cpuset/nomad/share`` (v1) or
    ``nomad.slice/share.slice`` (v2). A VM without reserved cores belongs there too, off the
    cores Nomad reserved for other tasks."""
    path = (
        root / "cpuset" / "nomad" / "share" / "cpuset.cpus"
        if version == "v1"
        else root / "nomad.slice" / "share.slice" / "cpuset.cpus"
    )
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def remove_cgroup_dirs(paths: tuple[str, ...]) -> list[str]:
    """rmdir each task cgroup (its processes are gone by then), then the shared parent if no
    other task uses it. What could not be removed, as messages (a missing one is fine: the
    journal records it before it exists)."""
    failures: list[str] = []
    for raw in paths:
        path = Path(raw)
        _end_stragglers(path)
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"cannot remove cgroup {path}: {exc.strerror or exc}")
            continue
        try:
            path.parent.rmdir()
        except OSError as exc:
            # Another task's cgroup is in it (or it is gone): it stays for that task.
            if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT):
                failures.append(f"cannot remove cgroup {path.parent}: {exc.strerror or exc}")
    return failures


def _end_stragglers(path: Path, wait: float = 5.0) -> None:
    """SIGKILL whatever still runs in the task's cgroup, and wait (bounded) until it is empty.
    The journal's processes are ended before this; what can remain is something they forked
    (a VMM wrapper's child, a helper's helper), which would otherwise keep the cgroup busy and
    run on unknown to anyone. Everything in this cgroup is the task's: the plugin made it."""
    procs = path / "cgroup.procs"
    deadline = time.monotonic() + wait
    while True:
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except (OSError, ValueError):
            return  # gone already, or not a cgroup the plugin can read
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # a killed process leaves cgroup.procs as it exits: poll for that


def detect(root: Path = CGROUP_ROOT) -> str | None:
    """The cgroup version the plugin uses here: "v2" (unified at ``root``), "v1" (the cpu,
    cpuset and memory controllers as v1 hierarchies under ``root``, whether or not an empty v2
    tree is mounted beside them: the hybrid layout), or None (no cgroup file system)."""
    if (root / "cgroup.controllers").is_file():
        return "v2"
    from nomad_vm.vm.cgroups.v1 import CONTROLLERS

    if all((root / c / "cgroup.procs").is_file() for c in CONTROLLERS):
        return "v1"
    return None


def task_cgroup(
    task_id: str, scope: str = "", root: Path = CGROUP_ROOT, version: str | None = None
) -> TaskCgroup:
    """The task's cgroup in the host's layout; CgroupError when there is none to use."""
    from nomad_vm.vm.cgroups.v1 import V1Cgroup
    from nomad_vm.vm.cgroups.v2 import V2Cgroup

    found = version or detect(root)
    if found == "v2":
        return V2Cgroup(root, cgroup_name(task_id, scope))
    if found == "v1":
        return V1Cgroup(root, cgroup_name(task_id, scope))
    raise CgroupError(f"no cgroup file system at {root} (neither v2 nor v1 cpu, cpuset and memory)")

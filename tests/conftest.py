"""Shared fixtures: the tiny guest, short temp dirs (unix socket paths are limited), and a
check that no QEMU process outlives the test that started it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def guest_cache() -> Path:
    return Path(os.environ.get("NOMAD_VM_CACHE", REPO / ".cache" / "guests"))


@pytest.fixture(scope="session")
def tiny_guest():  # type: ignore[no-untyped-def]
    from nomad_vm.guests.tiny import build_tiny

    return build_tiny(guest_cache())


@pytest.fixture(scope="session")
def debian_guest():  # type: ignore[no-untyped-def]
    from nomad_vm.guests.debian import build_debian

    return build_debian(guest_cache())


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nvt-", dir="/tmp"))
    # Traversable but not listable, like Nomad's <data_dir>/alloc: programs a test puts here
    # (fake VMMs and daemons) run as the unprivileged vm_user.
    path.chmod(0o711)
    cgroups_before = task_cgroups()
    yield path
    leftover = vm_processes_under(path)
    for proc in leftover:
        proc.kill()
    psutil.wait_procs(leftover, timeout=10)
    shutil.rmtree(path, ignore_errors=True)
    # Task cgroups the test's plugin made and did not remove: noted, then removed (after the
    # processes in them are gone) so that the host is left as it was, and the test fails.
    # Only empty ones: this test's processes are gone by now, and a new cgroup with processes
    # in it is a VM's of another test file running at the same time (pytest-xdist).
    stale = sorted(c for c in task_cgroups() - cgroups_before if not _has_processes(c))
    for cgroup in [*stale, *{c.parent for c in stale}]:
        with contextlib.suppress(OSError):  # a parent another task still uses stays
            cgroup.rmdir()
    assert not leftover, f"VM processes outlived the test: {[p.pid for p in leftover]}"
    assert not stale, f"task cgroups outlived the test: {stale}"


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _has_processes(cgroup: Path) -> bool:
    try:
        return bool((cgroup / "cgroup.procs").read_text().split())
    except OSError:
        return False


def task_cgroups() -> set[Path]:
    """The plugin's task cgroups on this host: ``nomad-vm/<task>`` in each cgroup v1
    hierarchy, or in the v2 tree (``nomad_vm.vm.cgroups``)."""
    found = [*CGROUP_ROOT.glob("*/nomad-vm/*"), *CGROUP_ROOT.glob("nomad-vm/*")]
    return {p for p in found if p.is_dir()}


def qemu_processes_under(path: Path) -> list[psutil.Process]:
    """QEMU processes whose command line mentions ``path`` (our tests put sockets there)."""
    return processes_under(path, "qemu-system")


def vm_processes_under(path: Path) -> list[psutil.Process]:
    """QEMU, the virtiofsd daemons serving its shares and its swtpm (leak checks look for
    all)."""
    return (
        processes_under(path, "qemu-system")
        + processes_under(path, "virtiofsd")
        + processes_under(path, "swtpm")
    )


def processes_under(path: Path, program: str) -> list[psutil.Process]:
    """Processes running ``program`` that name ``path`` on their command line, or work in it,
    or hold a descriptor of something under it (QEMU gets its sockets, files and shared
    directories as descriptors and its log as stderr, so its command line may name none)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if program in cmdline and (str(path) in cmdline or _uses(proc.pid, path)):
            found.append(proc)
    return found


def _uses(pid: int, path: Path) -> bool:
    """Does process ``pid`` work in or hold a descriptor of anything under ``path``?"""
    prefix = str(path).rstrip("/") + "/"
    links = [f"/proc/{pid}/cwd"]
    with contextlib.suppress(OSError):
        links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    for link in links:
        with contextlib.suppress(OSError):
            if (os.readlink(link) + "/").startswith(prefix):
                return True
    return False


def wait_until(predicate: Callable[[], object], timeout: float, every: float = 0.1) -> bool:
    """True as soon as ``predicate()`` is true, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def task_state_in(data_dir: Path) -> list[Path]:
    """What the plugin keeps in ``data_dir`` for tasks (journals, leases, runtime dirs, ...):
    everything except its control socket's directory, which lives as long as the plugin
    process does (``nomad_vm.control``), not as long as any task."""
    if not data_dir.exists():
        return []
    control = {"control"} | {p.name for p in data_dir.glob("control-*")}
    return [p for p in data_dir.rglob("*") if p.relative_to(data_dir).parts[0] not in control]

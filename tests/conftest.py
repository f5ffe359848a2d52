"""Shared fixtures: the tiny guest, short temp dirs (unix socket paths are limited), and a
check that no QEMU process outlives the test that started it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nomad_vm.driver.snapshot_seal import KEY_FILE

REPO = Path(__file__).resolve().parents[1]


# The order in which test directories run: those booting guests first, the quick unit tests
# last, so that `make test`'s two workers (pytest-xdist) finish together instead of one of them
# running the slowest files alone at the end.
DIRECTORY_ORDER = ("seed_examples", "e2e", "integration", "conformance", "unit")
# Directories whose files run one after another on one worker, never beside each other: the
# seed examples' agents reserve cores (`resources { cores }`) in the Nomad client's cpuset
# partition, which every agent on a host shares, and boot several Debian guests at once.
SERIAL_DIRECTORIES = ("seed_examples",)


def _top_directory(path: str) -> str:
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        top = _top_directory(item.path.relative_to(REPO).as_posix())
        return DIRECTORY_ORDER.index(top) if top in DIRECTORY_ORDER else len(DIRECTORY_ORDER)

    items.sort(key=rank)  # stable: a file's tests keep their order, and stay together


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's unit of work is a file (its module-scoped agent or guest is made once),
    or a whole directory of SERIAL_DIRECTORIES."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            top = _top_directory(path)
            return top if top in SERIAL_DIRECTORIES else path

    return FileScheduling(config, log)


def guest_cache() -> Path:
    return Path(os.environ.get("NOMAD_VM_CACHE", REPO / ".cache" / "guests"))


def keep_artifact(path: Path, name: str) -> Path:
    """A copy of ``path`` that outlives pytest's temporary directories, for people to look at
    after the run: ``$NOMAD_VM_TEST_ARTIFACTS/<name>``, else ``<repo>/test-artifacts/<name>``
    (git ignores it). The same name is overwritten by the next run."""
    directory = Path(os.environ.get("NOMAD_VM_TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    kept = directory / name
    shutil.copyfile(path, kept)
    return kept


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
    # Task cgroups made by the test's plugins (their data dirs are under ``path``; tests in
    # other files may run at the same time) and not removed: noted, then removed (after the
    # processes in them are gone) so that the host is left as it was, and the test fails.
    stale = sorted(task_cgroups(scopes_under(path)) - cgroups_before)
    shutil.rmtree(path, ignore_errors=True)
    for cgroup in [*stale, *{c.parent for c in stale}]:
        with contextlib.suppress(OSError):  # a parent another task still uses stays
            cgroup.rmdir()
    assert not leftover, f"VM processes outlived the test: {[p.pid for p in leftover]}"
    assert not stale, f"task cgroups outlived the test: {stale}"


CGROUP_ROOT = Path("/sys/fs/cgroup")


def task_cgroups(scopes: Iterable[Path] | None = None) -> set[Path]:
    """The plugin's task cgroups on this host: ``nomad-vm/<tag>-<task>`` in each cgroup v1
    hierarchy, or in the v2 tree (``nomad_vm.vm.cgroups``); only those of plugins whose
    data_dir is one of ``scopes`` when given."""
    from nomad_vm.vm.cgroups import scope_tag

    found = [*CGROUP_ROOT.glob("*/nomad-vm/*"), *CGROUP_ROOT.glob("nomad-vm/*")]
    tags = None if scopes is None else {scope_tag(str(s)) for s in scopes}
    return {p for p in found if p.is_dir() and (tags is None or p.name.split("-", 1)[0] in tags)}


def scopes_under(path: Path, depth: int = 3) -> list[Path]:
    """Every directory under ``path`` (to ``depth``): where a test's plugins keep data_dir."""
    found = [path]
    level = [path]
    for _ in range(depth):
        level = [c for d in level for c in _subdirs(d)]
        found += level
    return found


def _subdirs(path: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [c for c in path.iterdir() if c.is_dir() and not c.is_symlink()]
    return []


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
    everything except the node's own: its control socket's directory, which lives as long as
    the plugin process does (``nomad_vm.control``), and the key sealing snapshots, made at the
    first one (``driver.snapshot_seal``), not as long as any task."""
    if not data_dir.exists():
        return []
    node = {"control", KEY_FILE} | {p.name for p in data_dir.glob("control-*")}
    return [p for p in data_dir.rglob("*") if p.relative_to(data_dir).parts[0] not in node]

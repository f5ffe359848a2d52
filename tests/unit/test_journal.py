"""The task journal: its encoding (and the older DriverState it replaces), where it lives, and
process identities by start ticks and boot id."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import msgpack
import psutil
import pytest

from nomad_vm.driver.journal import JOURNAL_VERSION, RecordedProcess, TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.network_plan import NetworkRecord
from nomad_vm.errors import HypervisorError
from nomad_vm.processes import (
    ProcessIdentity,
    boot_id,
    identity_from_legacy,
    identity_of,
    is_same_process,
)
from nomad_vm.vm.hypervisor import VMM_ROLE

ME = identity_of(os.getpid())


def full_journal() -> TaskJournal:
    assert ME is not None
    helper = ProcessIdentity(ME.pid + 1, 5, ME.boot_id)
    return TaskJournal(
        task_id="alloc/web/1a2b",
        backend="qemu",
        started_at=1700000000.5,
        runtime_dir="/a/web/nomad-vm-1a2b",
        files=("/a/web/nomad-vm-1a2b/disk.qcow2", "/a/web/nomad-vm-1a2b/cidata.iso"),
        network=NetworkRecord("alloc/web/1a2b", "br0", "nvm1", "52:54:00:00:00:01", "10.0.0.5"),
        processes=(RecordedProcess("virtiofsd", helper), RecordedProcess(VMM_ROLE, ME)),
        control_socket="/a/web/nomad-vm-1a2b/qmp.sock",
        signal_unit="app.service",
        volumes=("/srv/pool/data",),
        cgroups=("/sys/fs/cgroup/cpu/nomad-vm/abc", "/sys/fs/cgroup/memory/nomad-vm/abc"),
    )


def test_round_trip_and_what_it_says() -> None:
    journal = full_journal()
    assert TaskJournal.decode(journal.encode()) == journal
    ref = journal.vm_ref()
    assert ref is not None and ref.vmm == ME and len(ref.helpers) == 1
    assert str(ref.control_socket).endswith("qmp.sock")
    # Before the VMM answered, the start is incomplete: there is nothing to reattach to.
    unfinished = TaskJournal("t", "qemu", 1.0, processes=journal.processes)
    assert unfinished.vm_ref() is None


def test_a_record_from_before_storage_pools_has_no_volumes() -> None:
    raw = msgpack.unpackb(full_journal().encode(), raw=False)
    del raw["volumes"]
    assert TaskJournal.decode(msgpack.packb(raw)).volumes == ()


def test_a_record_from_before_cgroups_has_none() -> None:
    raw = msgpack.unpackb(full_journal().encode(), raw=False)
    del raw["cgroups"]
    assert TaskJournal.decode(msgpack.packb(raw)).cgroups == ()


def test_the_replay_removes_files_and_keeps_pool_volumes(tmp_path: Path) -> None:
    import asyncio

    from nomad_vm.driver.replay import undo_host_changes

    runtime, pool = tmp_path / "run", tmp_path / "pool"
    runtime.mkdir()
    pool.mkdir()
    made = [runtime / "disk.qcow2", pool / ".nomad-vm-t-0-volume.part"]
    volume = pool / "data"
    for path in (*made, volume):
        path.write_bytes(b"x")
    journal = TaskJournal(
        "t", "qemu", 1.0, runtime_dir=str(runtime), files=tuple(map(str, made)),
        volumes=(str(volume),),
    )  # fmt: skip
    asyncio.run(undo_host_changes(journal, None, None))  # type: ignore[arg-type]
    assert not runtime.exists() and list(pool.iterdir()) == [volume]


def test_keys_are_strings_for_nomad_operator_client_state() -> None:
    raw = msgpack.unpackb(full_journal().encode(), raw=False)
    assert raw["version"] == JOURNAL_VERSION
    assert raw["processes"][1] == {"role": "vmm", **ME.to_dict()}  # type: ignore[union-attr]


def test_unknown_versions_and_garbage_are_refused() -> None:
    raw = msgpack.unpackb(full_journal().encode(), raw=False)
    with pytest.raises(HypervisorError, match="version 99"):
        TaskJournal.decode(msgpack.packb({**raw, "version": 99}))
    with pytest.raises(HypervisorError, match="msgpack"):
        TaskJournal.decode(b"\xc1")
    with pytest.raises(HypervisorError, match="damaged"):
        TaskJournal.decode(msgpack.packb({**raw, "processes": [{"role": "vmm"}]}))


def test_driver_state_of_older_plugins_is_read() -> None:
    """Version 1 (pid + psutil's wall-clock create_time): a live process that matched the old
    rule becomes a ticks identity; one that does not (recycled) is left out."""
    assert ME is not None
    created = psutil.Process(os.getpid()).create_time()
    legacy = {
        "task_id": "a/t/1",
        "backend": "qemu",
        "pid": os.getpid(),
        "process_start_time": created,
        "control_socket": "/s/qmp.sock",
        "runtime_dir": "/s",
        "started_at": 1700000001.0,
        "version": 1,
        "signal_unit": None,
        "signal_pidfile": "/run/app.pid",
        "helper_processes": [[os.getpid(), created - 1000.0]],
        "network": {"owner": "a/t/1", "bridge": "b", "tap": "t", "guest_mac": "m"},
    }
    journal = TaskJournal.decode(msgpack.packb(legacy))
    assert journal.vmm == ME
    assert journal.helpers == ()  # its start time does not match: not that process
    assert journal.signal_pidfile == "/run/app.pid" and journal.network is not None
    ref = journal.vm_ref()
    assert ref is not None and str(ref.runtime_dir) == "/s"


def test_identity_is_start_ticks_and_boot_id() -> None:
    assert ME is not None
    with open(f"/proc/{os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert ME.start_ticks == int(fields[19])  # field 22 of the whole line
    assert ME.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert is_same_process(ME)
    assert not is_same_process(ProcessIdentity(ME.pid, ME.start_ticks + 1, ME.boot_id))
    assert not is_same_process(ProcessIdentity(ME.pid, ME.start_ticks, "another-boot"))
    assert identity_of(2**22 + 1) is None  # above pid_max's ceiling: never a process


def test_a_process_name_with_parentheses_and_spaces_is_parsed() -> None:
    child = subprocess.Popen(
        ["/bin/sh", "-c", 'exec -a "odd ) name (" sleep 30'], stdout=subprocess.DEVNULL
    )
    try:
        ident = identity_of(child.pid)
        assert ident is not None
        assert ident.start_ticks == int(
            Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        )
    finally:
        child.kill()
        child.wait()


def test_a_zombie_is_not_the_process() -> None:
    child = subprocess.Popen(["true"])
    ident = identity_of(child.pid)
    assert ident is not None
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
    assert not is_same_process(ident)
    child.wait()


def test_legacy_identity_needs_the_old_tolerance() -> None:
    created = psutil.Process(os.getpid()).create_time()
    assert identity_from_legacy(os.getpid(), created) == ME
    assert identity_from_legacy(os.getpid(), created + 1.0) is None


def test_store_lives_in_data_dir_keyed_by_a_hash_private(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "data")
    journal = full_journal()
    path = store.path_for(journal.task_id)
    assert path.parent == tmp_path / "data" / "journal"
    assert journal.task_id.split("/")[-1] not in path.name and path.suffix == ".msgpack"
    assert store.load(journal.task_id) is None
    store.save(journal)
    assert store.load(journal.task_id) == journal
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.all() == [journal]
    store.remove(journal.task_id)
    assert store.load(journal.task_id) is None
    assert not path.parent.exists(), "the directory goes with the last journal"
    store.remove(journal.task_id)  # idempotent


def test_store_refuses_a_journal_under_another_tasks_name(tmp_path: Path) -> None:
    store = JournalStore(tmp_path)
    journal = full_journal()
    store.save(journal)
    os.rename(store.path_for(journal.task_id), store.path_for("other"))
    with pytest.raises(HypervisorError, match="not 'other'"):
        store.load("other")


def test_boot_id_is_read_once() -> None:
    assert boot_id() is boot_id()

"""Snapshots without a VMM: the option's validation, the machine record and what makes a
snapshot refused or used, the snapshot directory's files and permissions, the argv of a
restore, and the control socket's `snapshot` op. (A real save and resume: the integration
test tests/integration/test_snapshot.py and the e2e test tests/e2e/test_snapshot_agent.py.)"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.control.protocol import ProtocolError, decode_request
from nomad_vm.driver import snapshot_seal, snapshots
from nomad_vm.driver import snapshot_store as store
from nomad_vm.driver.startup import StartPlan
from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.files_argv import inherited_fds
from tests.unit.test_free_page_reporting import plan
from tests.unit.test_qemu_argv import SPECS


def task_dir(tmp_path: Path) -> Path:
    """The unit task's directory, with its local/ as Nomad makes it."""
    path = tmp_path / "alloc" / "t"
    (path / "local").mkdir(parents=True, exist_ok=True)
    return path


def test_cloud_hypervisor_saves_but_not_over_virtio_fs_naming_option_and_backend(
    tmp_path: Path,
) -> None:
    ch = {"snapshot_on_stop": True, "hypervisor": "cloud-hypervisor"}
    task_dir(tmp_path)  # its local/ is shared unless share_task_dirs = false
    with pytest.raises(ConfigError) as caught:
        plan(tmp_path, {**ch, "share_task_dirs": True})
    assert caught.value.field == "config.snapshot_on_stop"
    reason = caught.value.reason
    assert "virtio-fs" in reason and "cloud-hypervisor" in reason and "share_task_dirs" in reason
    assert "9p" not in reason  # CH shares over virtio-fs only
    assert not (tmp_path / "run").exists()
    assert plan(tmp_path, ch).vm.snapshot_on_stop


def test_the_option_is_a_bool(tmp_path: Path) -> None:
    assert plan(tmp_path, {"snapshot_on_stop": True}).vm.snapshot_on_stop
    assert not plan(tmp_path, {}).vm.snapshot_on_stop
    with pytest.raises(ConfigError) as caught:
        plan(tmp_path, {"snapshot_on_stop": "yes"})
    assert caught.value.field == "config.snapshot_on_stop"


def test_differences_name_each_changed_part() -> None:
    saved = {"memory_mb": 160, "vcpus": 1, "disks": [{"bus": "virtio"}]}
    now = {"memory_mb": 192, "vcpus": 1, "disks": [{"bus": "sata"}], "tpm": True}
    assert snapshots.differences(saved, now) == [
        'disks: [{"bus": "virtio"}] then, [{"bus": "sata"}] now',
        "memory_mb: 160 then, 192 now",
        "tpm: None then, True now",
    ]
    assert snapshots.differences(saved, dict(saved)) == []


KEY = b"k" * 32


def key() -> bytes:
    return KEY


def save_fake_snapshot(
    start: StartPlan, record_machine: dict[str, object], sealed_with: bytes | None = KEY
) -> Path:
    """A complete snapshot as ``snapshots.save`` leaves it (its state is not QEMU's here);
    ``sealed_with`` None: as a job could plant one (no seal)."""
    directory = task_dir(Path(start.task.alloc_dir).parent)
    fd = store.begin_snapshot(directory)
    try:
        for name, data in ((store.STATE_FILE, b"state"), ("disk.qcow2", b"disk")):
            out = store.create_file(fd, name)
            os.write(out, data)
            os.close(out)
        record = {
            "version": snapshots.RECORD_VERSION,
            "machine": record_machine,
            "files": ["disk.qcow2"],
            "saved_at": 0.0,
            "state_bytes": 5,
        }
        if sealed_with is not None:
            names = [store.STATE_FILE, "disk.qcow2"]
            record = snapshot_seal.seal(record, fd, names, sealed_with)
        snapshots._write_record(fd, record)
    finally:
        os.close(fd)
    store.commit_snapshot(directory)
    return store.snapshot_dir(directory)


def test_a_matching_snapshot_is_found_and_a_different_one_refused_and_removed(
    tmp_path: Path,
) -> None:
    task_dir(tmp_path)
    start = plan(tmp_path, {})
    where = save_fake_snapshot(start, snapshots.machine_record(start))
    found = snapshots.find_restore(start, key)
    assert found.refused is None and found.restore is not None
    assert found.restore.files == ("disk.qcow2",)
    run_dir = tmp_path / "rundir"
    run_dir.mkdir()
    (run_dir / "disk.qcow2").write_bytes(b"fresh")
    assert store.put_back(found.restore, run_dir, "disk.qcow2")
    assert (run_dir / "disk.qcow2").read_bytes() == b"disk"
    assert not store.put_back(found.restore, run_dir, "uefi-vars.fd")
    snapshots.consume(found.restore, Path(start.task.task_dir))
    assert not where.exists()

    machine = snapshots.machine_record(start)
    save_fake_snapshot(start, {**machine, "memory_mb": machine["memory_mb"] + 64})
    found = snapshots.find_restore(start, key)
    assert found.restore is None
    assert found.refused == (
        "the task's machine differs from the one saved: "
        f"memory_mb: {machine['memory_mb'] + 64} then, 128 now"
    )
    assert not where.exists()


def test_an_unreadable_snapshot_is_refused_and_removed(tmp_path: Path) -> None:
    task_dir(tmp_path)
    start = plan(tmp_path, {})
    where = save_fake_snapshot(start, snapshots.machine_record(start))
    (where / store.RECORD_FILE).write_text("{not json")
    found = snapshots.find_restore(start, key)
    assert found.restore is None and found.refused is not None
    assert "cannot be used" in found.refused
    assert not where.exists()


@pytest.mark.parametrize("sealed_with", [None, b"o" * 32])
def test_a_snapshot_this_plugin_did_not_seal_is_refused(
    tmp_path: Path, sealed_with: bytes | None
) -> None:
    """Planted in local/ by a job's template or artifact (no seal), or sealed under another
    node's key: never handed to QEMU."""
    task_dir(tmp_path)
    start = plan(tmp_path, {})
    where = save_fake_snapshot(start, snapshots.machine_record(start), sealed_with)
    found = snapshots.find_restore(start, key)
    assert found.restore is None and found.refused is not None
    assert "not written by this node's plugin" in found.refused
    assert not where.exists()


def test_a_sealed_snapshot_whose_file_changed_is_refused(tmp_path: Path) -> None:
    """The seal covers each file's content: a disk overlay swapped afterwards is refused."""
    task_dir(tmp_path)
    start = plan(tmp_path, {})
    where = save_fake_snapshot(start, snapshots.machine_record(start))
    (where / "disk.qcow2").write_bytes(b"a crafted overlay")
    found = snapshots.find_restore(start, key)
    assert found.restore is None
    assert found.refused == "it cannot be used: its file disk.qcow2 changed since it was saved"


def test_the_node_key_is_made_once_private_and_checked(tmp_path: Path) -> None:
    first = snapshot_seal.node_key(tmp_path)
    assert snapshot_seal.node_key(tmp_path) == first and len(first) == 32
    path = tmp_path / snapshot_seal.KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(HypervisorError, match="mode 0600"):
        snapshot_seal.node_key(tmp_path)


def test_no_snapshot_is_no_restore(tmp_path: Path) -> None:
    assert snapshots.find_restore(plan(tmp_path, {}), key) == snapshots.Found(None)


def test_the_snapshot_dir_is_private_and_never_a_symlink(tmp_path: Path) -> None:
    directory = task_dir(tmp_path)
    fd = store.begin_snapshot(directory)
    os.close(store.create_file(fd, store.STATE_FILE))
    os.close(fd)
    store.commit_snapshot(directory)
    where = store.snapshot_dir(directory)
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert stat.S_IMODE((where / store.STATE_FILE).stat().st_mode) == 0o600
    assert store.remove_snapshot(directory)
    # Someone put a symlink where the snapshot would be: not followed, not used.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where.symlink_to(elsewhere)
    with pytest.raises(HypervisorError, match="cannot open the snapshot"):
        store.open_snapshot(directory)
    # ... and removing it removes the link, not what it points to.
    assert store.remove_snapshot(directory)
    assert elsewhere.is_dir() and not where.is_symlink()


def test_a_file_copied_keeps_its_holes(tmp_path: Path) -> None:
    source, target = tmp_path / "a", tmp_path / "b"
    source.mkdir()
    target.mkdir()
    with open(source / "disk", "wb") as out:
        out.write(b"head")
        out.seek(64 << 20)
        out.write(b"tail")
    src, dst = store.open_dir(source), store.open_dir(target)
    try:
        store.move_file(src, dst, "disk", keep=True)
    finally:
        os.close(src)
        os.close(dst)
    copied = target / "disk"
    assert copied.read_bytes() == (source / "disk").read_bytes()
    assert copied.stat().st_blocks * 512 < 1 << 20  # sparse, not 64 MiB
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600


def test_a_restore_is_an_inherited_descriptor_given_to_incoming() -> None:
    spec = replace(SPECS["kernel_tcg"], incoming_fd=77)
    argv = qemu_argv("qemu-system-x86_64", spec)
    assert argv[-2:] == ["-incoming", "fd:77"]
    assert 77 in inherited_fds(spec)
    assert "-incoming" not in qemu_argv("qemu-system-x86_64", SPECS["kernel_tcg"])


def test_the_control_socket_snapshot_op_needs_a_task() -> None:
    assert decode_request(json.dumps({"op": "snapshot", "task": "ab"}).encode()).op == "snapshot"
    with pytest.raises(ProtocolError, match="task: snapshot needs a task"):
        decode_request(b'{"op": "snapshot"}')

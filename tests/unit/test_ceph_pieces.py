"""Ceph pools without a cluster: the journal's RBD records, QEMU's rbd nodes and secret
object, the key's memfd, and a replay that cannot reach a pool keeping the journal."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import msgpack
import pytest

from nomad_vm.driver.journal import RbdRecord, TaskJournal
from nomad_vm.driver.replay import undo_host_changes
from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.storage.ceph_pool import CephPool, Monitor, parse_ceph_pool
from nomad_vm.storage.held import FileHolder
from nomad_vm.storage.rbd_keys import key_memfd
from nomad_vm.vm.qemu.files_argv import FdSets, disk_argv, inherited_fds
from nomad_vm.vm.spec import DiskSpec, RbdSpec, VMSpec

KEY = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="
POOL = CephPool("remote", "nomad-pool", (Monitor("127.0.0.1", 3300),), "nomad", KEY)


def test_rbd_records_round_trip_and_older_journals_have_none() -> None:
    journal = TaskJournal("t", "qemu", 1.0).with_rbd(RbdRecord("remote", "img"))
    journal = journal.with_rbd(RbdRecord("remote", "data", "snap"))
    assert TaskJournal.decode(journal.encode()).rbd == journal.rbd
    raw = msgpack.unpackb(journal.encode(), raw=False)
    del raw["rbd"]
    assert TaskJournal.decode(msgpack.packb(raw)).rbd == ()
    assert KEY.encode() not in journal.encode()


def test_a_replay_whose_pool_is_gone_fails_and_names_what_is_left() -> None:
    journal = TaskJournal("t", "qemu", 1.0, rbd=(RbdRecord("remote", "nomad-vm-x-0"),))
    with pytest.raises(HypervisorError, match="remote:nomad-vm-x-0"):
        asyncio.run(undo_host_changes(journal, None, None, {}))  # type: ignore[arg-type]


def test_an_rbd_disk_is_a_raw_node_on_librbd_with_the_key_from_a_descriptor() -> None:
    with FileHolder() as holder:
        key = key_memfd(KEY, holder, owner=None)
        disk = DiskSpec(None, "raw", rbd=RbdSpec(POOL, "data", key=key))
        argv = disk_argv(FdSets(), disk, "disk1")
        assert KEY not in " ".join(argv)
        assert argv[:2] == [
            "-object",
            f"secret,id=disk1-key,file=/proc/self/fd/{key.fd},format=base64",
        ]
        node = json.loads(argv[3])
        assert node["driver"] == "raw" and node["node-name"] == "disk1"
        assert node["file"] == {
            "driver": "rbd",
            "pool": "nomad-pool",
            "image": "data",
            "server": [{"host": "127.0.0.1", "port": "3300"}],
            "user": "nomad",
            "key-secret": "disk1-key",
            "auth-client-required": ["cephx"],
            "conf": "/dev/null",
            "read-only": False,
            "discard": "unmap",
        }
        spec = VMSpec(name="v", vcpus=1, memory_mb=64, kernel=None, initramfs=None, cmdline="",
                      accelerator="tcg", control_socket=Path("/x"), disk=disk)  # fmt: skip
        assert key.fd in inherited_fds(spec)


def test_the_key_memfd_is_sealed_and_0400() -> None:
    with FileHolder() as holder:
        key = key_memfd(KEY, holder, owner=None)
        assert stat.S_IMODE(os.fstat(key.fd).st_mode) == 0o400
        assert os.pread(key.fd, 100, 0) == KEY.encode()
        with pytest.raises(PermissionError):
            os.pwrite(key.fd, b"x", 0)


@pytest.mark.parametrize(
    ("hosts", "field"),
    [
        (["[::1]:3300", "mon:6789"], None),
        (["mon"], "hosts[0]"),
        (["mon:99999"], "hosts[0]"),
    ],
)
def test_monitors_are_host_port(hosts: list[str], field: str | None) -> None:
    body = {"pool": "p", "hosts": hosts, "authentication": {"username": "u", "secret": KEY}}
    if field is None:
        pool = parse_ceph_pool("c", body)
        assert pool.mon_host == "[::1]:3300,mon:6789"
        assert KEY not in repr(pool)
        return
    with pytest.raises(ConfigError) as err:
        parse_ceph_pool("c", body)
    assert err.value.field == f"config.storage_pools.ceph.c.{field}"


def fake_qemu(tmp_path: Path, says: str) -> Path:
    """An executable answering the rbd probe as a QEMU with or without the driver would."""
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f'#!/bin/sh\necho "qemu-system-x86_64: -blockdev ...: {says}" >&2\nexit 1\n')
    path.chmod(0o755)
    return path


def test_a_qemu_without_rbd_is_reported_and_its_ceph_disks_refused(tmp_path: Path) -> None:
    from nomad_vm.driver.config import parse_plugin_config, parse_task_config
    from nomad_vm.driver.startup import refuse_unusable_ceph
    from nomad_vm.identity import ALIASES
    from nomad_vm.storage.ceph_support import ceph_problem
    from tests.unit.tasks import unit_task

    without = fake_qemu(tmp_path, "Parameter 'driver' does not accept value 'rbd'")
    problem = ceph_problem(str(without))
    assert problem is not None and "qemu-block-extra" in problem
    (tmp_path / "ok").mkdir()
    with_rbd = fake_qemu(tmp_path / "ok", "Parameter 'pool' is missing")
    assert ceph_problem(str(with_rbd)) is None
    body = {"pool": "p", "hosts": ["127.0.0.1:3300"],
            "authentication": {"username": "u", "secret": KEY}}  # fmt: skip
    raw = {"image_paths": [str(tmp_path)], "qemu_binary": str(without),
           "storage_pools": {"ceph": {"remote": body}}}  # fmt: skip
    plugin = parse_plugin_config(raw, ALIASES["virt"])
    vm = parse_task_config(
        unit_task(tmp_path / "alloc", {"disk": [{"pool": "remote", "size": "1G"}]}), plugin
    )
    with pytest.raises(ConfigError) as err:
        refuse_unusable_ceph(vm, str(without))
    assert err.value.field == "config.disk[0].pool" and "qemu-block-extra" in err.value.reason

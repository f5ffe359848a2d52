"""Cloud Hypervisor's snapshot directory to the driver's one state file and back
(``vm/cloud_hypervisor/snapshot.py``): what CH wrote is read as root without following links,
and a restore unpacks only the state and the memory, as new files, with this start's config.
(Through the backend and CH's fake VMM: tests/conformance/test_snapshot_contract.py.)"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.cloud_hypervisor import snapshot

SAVED = {"config.json": b'{"old": "config"}', "state.json": b'{"devices": []}'}
MEMORY = b"\x01" * 8192


def saved_by_ch(tmp_path: Path) -> Path:
    directory = snapshot.fresh_dir(tmp_path, snapshot.SAVE_DIR)
    for name, data in {**SAVED, "memory-ranges": MEMORY}.items():
        (directory / name).write_bytes(data)
    return directory


def state_file(tmp_path: Path) -> int:
    return os.open(tmp_path / "state", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def test_a_snapshot_goes_into_one_file_and_back_with_this_starts_config(tmp_path: Path) -> None:
    fd = state_file(tmp_path)
    try:
        assert snapshot.pack(saved_by_ch(tmp_path), fd) == len(MEMORY)
        target = snapshot.fresh_dir(tmp_path, snapshot.RESTORE_DIR)
        snapshot.unpack(fd, target, b'{"new": "config"}')
    finally:
        os.close(fd)
    assert (target / "state.json").read_bytes() == SAVED["state.json"]
    assert (target / "memory-ranges").read_bytes() == MEMORY
    assert (target / "config.json").read_bytes() == b'{"new": "config"}'
    for path in target.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_uid == tmp_path.stat().st_uid
    snapshot.remove_dir(target)
    assert not target.exists()


@pytest.mark.parametrize("planted", ["link", "fifo", "missing"])
def test_what_ch_wrote_is_only_taken_as_regular_files(tmp_path: Path, planted: str) -> None:
    directory = saved_by_ch(tmp_path)
    secret = tmp_path / "root-only"
    secret.write_bytes(b"not for the snapshot")
    (directory / "state.json").unlink()
    if planted == "link":
        (directory / "state.json").symlink_to(secret)
    elif planted == "fifo":
        os.mkfifo(directory / "state.json")
    fd = state_file(tmp_path)
    try:
        with pytest.raises(HypervisorError, match=r"state\.json"):
            snapshot.pack(directory, fd)
    finally:
        os.close(fd)
    assert b"not for the snapshot" not in (tmp_path / "state").read_bytes()


def test_a_link_in_place_of_the_directory_is_removed_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"x")
    (tmp_path / snapshot.SAVE_DIR).symlink_to(elsewhere)
    directory = snapshot.fresh_dir(tmp_path, snapshot.SAVE_DIR)
    assert directory.is_dir() and not directory.is_symlink()
    assert (elsewhere / "keep").exists()


def tar_of(members: list[tarfile.TarInfo], data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return out.getvalue()


def regular(name: str, size: int = 4) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ([regular("state.json"), regular("../escape")], r"unexpected '\.\./escape'"),
        ([regular("state.json"), link("memory-ranges", "/etc/shadow")], "not a file"),
        ([regular("state.json"), regular("state.json")], r"unexpected 'state\.json'"),
        ([regular("config.json"), regular("state.json")], "lacks memory-ranges"),
    ],
    ids=["other-name", "link", "twice", "missing"],
)
def test_a_restore_unpacks_only_the_state_and_the_memory(
    tmp_path: Path, members: list[tarfile.TarInfo], error: str
) -> None:
    fd = state_file(tmp_path)
    os.write(fd, tar_of(members, b"data"))
    target = snapshot.fresh_dir(tmp_path, snapshot.RESTORE_DIR)
    try:
        with pytest.raises(HypervisorError, match=error):
            snapshot.unpack(fd, target, b"{}")
    finally:
        os.close(fd)
    assert not (tmp_path / "escape").exists()
    assert not [p for p in target.iterdir() if p.is_symlink()]

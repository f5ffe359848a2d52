"""storage/held.py: a job's file is opened once and checked on the descriptor, never by name."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.errors import ImageError
from nomad_vm.storage.held import (
    FileHolder,
    open_allowed,
    open_own,
    read_allowed_text,
    readable_copy,
)
from nomad_vm.storage.paths import Allowlist, private_dir

ADVICE = "add its directory to the plugin's image_paths"


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


@pytest.fixture
def holder() -> Iterator[FileHolder]:
    with FileHolder() as files:
        yield files


def open_it(path: Path, allowed: Path | Allowlist, holder: FileHolder):  # type: ignore[no-untyped-def]
    dirs = allowed if isinstance(allowed, Allowlist) else [str(allowed)]
    return open_allowed("config.kernel", path, dirs, holder, subject=str(path), advice=ADVICE)


def test_the_descriptor_is_the_file_that_was_checked(allowed: Path, holder: FileHolder) -> None:
    kernel = allowed / "vmlinux"
    kernel.write_bytes(b"validated")
    held = open_it(kernel, allowed, holder)
    # Replaced by a link to something else afterwards: the descriptor still reads the original.
    elsewhere = allowed.parent / "secret"
    elsewhere.write_bytes(b"secret")
    kernel.unlink()
    kernel.symlink_to(elsewhere)
    assert os.pread(held.fd, 100, 0) == b"validated"
    assert held.path == allowed / "vmlinux"
    assert not held.writable


def test_a_symlink_out_of_the_allowed_dirs_is_refused_on_the_descriptor(
    allowed: Path, holder: FileHolder
) -> None:
    secret = allowed.parent / "secret"
    secret.write_bytes(b"secret")
    link = allowed / "innocent"
    link.symlink_to(secret)
    with pytest.raises(ImageError) as err:
        open_it(link, allowed, holder)
    assert err.value.field == "config.kernel"
    assert f"resolves to {secret}, which is outside the allowed directories" in err.value.reason
    assert holder.fds == ()


def test_a_link_into_the_plugins_state_is_refused(allowed: Path, holder: FileHolder) -> None:
    state = allowed / "state"
    state.mkdir()
    (state / "disk.qcow2").write_bytes(b"theirs")
    link = allowed / "mine"
    link.symlink_to(state / "disk.qcow2")
    allowlist = Allowlist((str(allowed),), (private_dir(state),))
    with pytest.raises(ImageError, match="part of the VM driver's own state"):
        open_it(link, allowlist, holder)


def test_a_fifo_is_refused_without_blocking(allowed: Path, holder: FileHolder) -> None:
    """O_PATH opens no FIFO for reading: the check refuses it before anything could block."""
    fifo = allowed / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        open_it(fifo, allowed, holder)


def test_a_missing_file_names_the_field(allowed: Path, holder: FileHolder) -> None:
    with pytest.raises(ImageError, match="no such file") as err:
        open_it(allowed / "gone", allowed, holder)
    assert err.value.field == "config.kernel"


def test_the_holder_closes_every_descriptor(allowed: Path) -> None:
    (allowed / "a").write_bytes(b"a")
    with FileHolder() as files:
        held = open_it(allowed / "a", allowed, files)
        own = open_own(allowed / "a", files, writable=True)
        fds = (held.fd, own.fd)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_open_own_never_follows_a_symlink(allowed: Path, holder: FileHolder) -> None:
    (allowed / "real").write_bytes(b"")
    (allowed / "link").symlink_to(allowed / "real")
    with pytest.raises(OSError):
        open_own(allowed / "link", holder, writable=True)


def test_a_world_readable_file_is_passed_as_it_is(allowed: Path, holder: FileHolder) -> None:
    kernel = allowed / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    held = open_it(kernel, allowed, holder)
    assert readable_copy(held, holder) is held


def test_an_owner_only_file_becomes_a_sealed_copy(allowed: Path, holder: FileHolder) -> None:
    """Reopening /proc/self/fd/N checks permissions; a memfd is readable by whoever holds it,
    and the seals keep anyone from changing the copy."""
    kernel = allowed / "vmlinux"
    data = os.urandom(3 * 1024 * 1024 + 17)
    kernel.write_bytes(data)
    kernel.chmod(0o600)
    held = open_it(kernel, allowed, holder)
    copy = readable_copy(held, holder)
    assert copy.fd != held.fd
    assert os.readlink(copy.proc_path).startswith("/memfd:vmlinux")
    with open(copy.proc_path, "rb") as reread:
        assert reread.read() == data
    seals = fcntl.fcntl(copy.fd, fcntl.F_GET_SEALS)
    wanted = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    assert seals & wanted == wanted
    with pytest.raises(PermissionError):
        os.write(copy.fd, b"x")


def test_user_data_is_read_from_the_checked_descriptor(allowed: Path) -> None:
    doc = allowed / "user-data"
    doc.write_text("#cloud-config\n")
    assert read_allowed_text("config.user_data", doc, [str(allowed)], subject="x", advice="") == (
        "#cloud-config\n"
    )
    doc.write_bytes(b"\xff\xfe")
    with pytest.raises(ImageError) as err:
        read_allowed_text("config.user_data", doc, [str(allowed)], subject="x", advice="")
    assert err.value.field == "config.user_data"


def test_a_link_to_an_allowed_file_is_followed_by_resolving_it_first(
    allowed: Path, holder: FileHolder
) -> None:
    (allowed / "v1").write_bytes(b"kernel v1")
    (allowed / "current").symlink_to("v1")
    held = open_it(allowed / "current", allowed, holder)
    assert held.path == allowed / "v1"


def test_a_symlink_swapped_in_after_resolving_is_refused_not_followed(
    allowed: Path, holder: FileHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk below the allowed directory follows no symlink (openat2 RESOLVE_NO_SYMLINKS):
    a name that was a file when it was resolved and is a link when it is opened is refused."""
    kernel = allowed / "vmlinux"
    kernel.write_bytes(b"validated")
    elsewhere = allowed / "other"
    elsewhere.write_bytes(b"other file, also allowed")
    real_resolve = Path.resolve

    def resolve_then_swap(self: Path, strict: bool = False) -> Path:
        resolved = real_resolve(self, strict=strict)
        if self == kernel:
            kernel.unlink()
            kernel.symlink_to(elsewhere)
        return resolved

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    with pytest.raises(ImageError, match="a symlink appeared in") as err:
        open_it(kernel, allowed, holder)
    assert err.value.field == "config.kernel"
    assert holder.fds == ()

"""Choosing how shares reach the guest, and the virtiofsd command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from nomad_vm.cloudinit import CloudInitRequest, GuestMount, render
from nomad_vm.errors import VMRequestError
from nomad_vm.vm.share_transport import choose_share_transport, identify_virtiofsd
from nomad_vm.vm.spec import ShareSpec
from nomad_vm.vm.virtiofsd import daemon_argv

# What the two daemons answer, reduced to the lines the identification looks at.
RUST_DAEMON = """#!/bin/sh
case "$1" in
--version) echo "virtiofsd 1.14.0" ;;
*) printf '%s\\n' 'Usage: virtiofsd [OPTIONS]' '      --shared-dir <SHARED_DIR>' \\
     '      --tag <TAG>' '      --readonly' '      --sandbox <SANDBOX>' '      --cache <CACHE>' \\
     '      --fd <FD>' '      --inode-file-handles=<INODE_FILE_HANDLES>' ;;
esac
"""
LEGACY_C_DAEMON = """#!/bin/sh
case "$1" in
--version) echo "virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)"; echo "Copyright" ;;
*) printf '%s\\n' "usage: $0 [options]" '    -o source=PATH             shared directory tree' \\
     '    --socket-path=PATH         path for the vhost-user socket' '    --fd=FDNUM' ;;
esac
"""


def write_daemon(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


@pytest.fixture
def no_libexec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nomad_vm.vm.share_transport.LIBEXEC_PATHS", ())


@pytest.fixture
def path_with_virtiofsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libexec: None) -> Path:
    monkeypatch.setenv("PATH", str(tmp_path))
    return write_daemon(tmp_path / "virtiofsd", RUST_DAEMON)


@pytest.fixture
def path_without_virtiofsd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libexec: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))


def test_auto_uses_virtiofs_when_virtiofsd_is_on_path(path_with_virtiofsd: Path) -> None:
    chosen = choose_share_transport("auto", None)
    assert (chosen.name, chosen.virtiofsd) == ("virtiofs", path_with_virtiofsd)
    assert "virtiofsd 1.14.0" in chosen.reason and not chosen.fallback


def test_auto_falls_back_to_9p_and_says_why(path_without_virtiofsd: None) -> None:
    chosen = choose_share_transport("auto", "")
    assert (chosen.name, chosen.virtiofsd, chosen.fallback) == ("9p", None, True)
    assert "virtiofsd" in chosen.reason and "not found" in chosen.reason
    assert "cargo install virtiofsd" in chosen.reason


def test_the_legacy_c_daemon_is_recognised_and_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's /usr/lib/qemu/virtiofsd: not on PATH, takes `-o source=`, no read-only."""
    legacy = write_daemon(tmp_path / "libexec" / "virtiofsd", LEGACY_C_DAEMON)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("nomad_vm.vm.share_transport.LIBEXEC_PATHS", (str(legacy),))
    chosen = choose_share_transport("auto", None)
    assert (chosen.name, chosen.fallback) == ("9p", True)
    assert f"{legacy} is QEMU's legacy C virtiofsd (version 7.2.22" in chosen.reason
    found = identify_virtiofsd(legacy)
    assert not found.usable and "read-only" in found.problem


def test_a_usable_daemon_wins_over_a_legacy_one_found_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_daemon(tmp_path / "first" / "virtiofsd", LEGACY_C_DAEMON)
    rust = write_daemon(tmp_path / "libexec" / "virtiofsd", RUST_DAEMON)
    monkeypatch.setenv("PATH", str(tmp_path / "first"))
    monkeypatch.setattr("nomad_vm.vm.share_transport.LIBEXEC_PATHS", (str(rust),))
    assert choose_share_transport("auto", None).virtiofsd == rust


def test_a_daemon_without_our_options_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libexec: None
) -> None:
    old = RUST_DAEMON.replace("'      --tag <TAG>' ", "").replace("1.14.0", "1.2.0")
    write_daemon(tmp_path / "virtiofsd", old)
    monkeypatch.setenv("PATH", str(tmp_path))
    chosen = choose_share_transport("auto", None)
    assert chosen.name == "9p" and "virtiofsd 1.2.0) does not know --tag" in chosen.reason


def test_a_configured_legacy_daemon_is_an_error_naming_the_option(tmp_path: Path) -> None:
    legacy = write_daemon(tmp_path / "virtiofsd", LEGACY_C_DAEMON)
    with pytest.raises(VMRequestError) as err:
        choose_share_transport("auto", str(legacy))
    assert err.value.option == "virtiofsd_binary" and "legacy C" in str(err.value)


def test_9p_is_used_even_when_virtiofsd_exists(path_with_virtiofsd: Path) -> None:
    assert choose_share_transport("9p", None).name == "9p"


def test_virtiofs_without_virtiofsd_is_an_error_naming_the_option(
    path_without_virtiofsd: None,
) -> None:
    with pytest.raises(VMRequestError) as err:
        choose_share_transport("virtiofs", None)
    assert err.value.option == "share_transport" and "make setup" in str(err.value)


def test_a_named_binary_that_is_missing_is_an_error_not_9p(tmp_path: Path) -> None:
    with pytest.raises(VMRequestError) as err:
        choose_share_transport("auto", str(tmp_path / "nope" / "virtiofsd"))
    assert err.value.option == "virtiofsd_binary" and "does not exist" in str(err.value)


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(VMRequestError, match="'nfs' is not one of auto, virtiofs, 9p"):
        choose_share_transport("nfs", None)


def test_daemon_argv_makes_read_only_shares_read_only() -> None:
    share = ShareSpec("nomad-local", Path("/a/local"), "/local", True, Path("/r/vfs0.sock"))
    argv = daemon_argv(Path("/bin/virtiofsd"), share, 7)
    assert argv[:4] == ["/bin/virtiofsd", "--fd=7", "--shared-dir=/a/local", "--tag=nomad-local"]
    assert "--readonly" in argv
    writable = ShareSpec("v", Path("/v"), "/v", False, Path("/r/vfs1.sock"))
    assert "--readonly" not in daemon_argv(Path("/bin/virtiofsd"), writable, 7)
    sandbox = "--sandbox=namespace" if os.geteuid() == 0 else "--sandbox=none"
    assert sandbox in argv


def test_cloud_init_mounts_each_transport_with_its_fstype() -> None:
    mounts = (
        GuestMount("nomad-local", "/local", True, "virtiofs"),
        GuestMount("nomad-vol0", "/data", False, "9p"),
    )
    docs = render(CloudInitRequest(instance_id="i", hostname="h", mounts=mounts))
    assert yaml.safe_load(docs.user_data)["mounts"] == [
        ["nomad-local", "/local", "virtiofs", "ro,nofail", "0", "0"],
        [
            "nomad-vol0",
            "/data",
            "9p",
            "trans=virtio,version=9p2000.L,msize=262144,rw,nofail",
            "0",
            "0",
        ],
    ]

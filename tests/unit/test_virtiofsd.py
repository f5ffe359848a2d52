"""Choosing how shares reach the guest, and the virtiofsd command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from nomad_vm.cloudinit import CloudInitRequest, GuestMount, render
from nomad_vm.errors import ConfigError
from nomad_vm.vm.spec import ShareSpec
from nomad_vm.vm.virtiofsd import choose_share_transport, daemon_argv


@pytest.fixture
def path_with_virtiofsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "virtiofsd"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return binary


@pytest.fixture
def path_without_virtiofsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("nomad_vm.vm.virtiofsd.LIBEXEC_PATHS", ())


def test_auto_uses_virtiofs_when_virtiofsd_is_on_path(path_with_virtiofsd: Path) -> None:
    chosen = choose_share_transport("auto", None)
    assert (chosen.name, chosen.virtiofsd) == ("virtiofs", path_with_virtiofsd)


def test_auto_falls_back_to_9p_and_says_why(path_without_virtiofsd: None) -> None:
    chosen = choose_share_transport("auto", "")
    assert (chosen.name, chosen.virtiofsd) == ("9p", None)
    assert "virtiofsd" in chosen.reason and "not found" in chosen.reason


def test_9p_is_used_even_when_virtiofsd_exists(path_with_virtiofsd: Path) -> None:
    assert choose_share_transport("9p", None).name == "9p"


def test_virtiofs_without_virtiofsd_is_an_error_naming_the_option(
    path_without_virtiofsd: None,
) -> None:
    with pytest.raises(ConfigError) as err:
        choose_share_transport("virtiofs", None)
    assert err.value.field == "config.share_transport" and "make setup" in str(err.value)


def test_a_named_binary_that_is_missing_is_an_error_not_9p(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        choose_share_transport("auto", str(tmp_path / "nope" / "virtiofsd"))
    assert err.value.field == "config.virtiofsd_binary" and "does not exist" in str(err.value)


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ConfigError, match="'nfs' is not one of auto, virtiofs, 9p"):
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

"""`nomad-vm demo` keeps its files in a private directory (issue 10), not a fixed /tmp path
that another user could create first: the default under the user's XDG state dir, mode 0700,
and a directory that is a symlink, someone else's or open to others is refused before the demo
runs or trusts its pid file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nomad_vm.cli import demo
from nomad_vm.cli.paths import NotPrivateError, demo_dir, private_dir


def test_the_default_is_under_the_users_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NOMAD_VM_DEMO_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert demo_dir() == tmp_path / "state" / "nomad-vm" / "demo"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_dir() == tmp_path / "home" / ".local" / "state" / "nomad-vm" / "demo"


def test_it_is_created_private(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "state" / "nomad-vm" / "demo")
    for made in (path, path.parent):
        info = os.lstat(made)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
    assert private_dir(path) == path  # again: fine


def test_a_symlink_planted_by_name_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.symlink(theirs, tmp_path / "demo")
    with pytest.raises(NotPrivateError, match="not a directory"):
        private_dir(tmp_path / "demo")


def test_a_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(NotPrivateError, match="mode 0777, open to other users"):
        private_dir(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_someone_elses_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(NotPrivateError, match="belongs to uid 65534, not to you"):
        private_dir(path)


def test_the_demo_refuses_to_start_or_stop_with_a_directory_not_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before it builds, starts or signals anything: here a pid file in a world-writable dir
    names this very test process, which must not be signalled."""
    path = tmp_path / "demo"
    path.mkdir()
    path.chmod(0o777)
    (path / "agent.pid").write_text(str(os.getpid()))
    monkeypatch.setenv("NOMAD_VM_DEMO_DIR", str(path))

    def must_not_run(*_: object) -> object:
        raise AssertionError("the demo went ahead")

    monkeypatch.setattr(demo, "build_tiny", must_not_run)
    monkeypatch.setattr(demo.os, "killpg", must_not_run)
    assert demo.run_demo() == 1
    assert "refusing to run the demo" in capsys.readouterr().out
    assert demo.stop_demo() == 1
    assert "open to other users" in capsys.readouterr().out

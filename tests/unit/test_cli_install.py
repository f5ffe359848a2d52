"""`nomad-vm install`: the wrapper and plugin block it writes, idempotence, refusals, host check.

The host check is a stand-in here (no QEMU in unit tests); tests/e2e/test_install_path.py runs
the real command from a fresh venv against a real agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nomad_vm.cli import doctor
from nomad_vm.cli.install import (
    CONFIG_FILE_NAME,
    InstallRequest,
    install,
    installed_driver,
    wrapper_script,
)
from nomad_vm.cli.main import main
from nomad_vm.cli.vm_account import AccountError


class Run:
    """One `install` call: its exit status, its output, and how often the host was checked."""

    def __init__(self, request: InstallRequest, driver: Path, host_status: int = 0) -> None:
        self.lines: list[str] = []
        self.checks = 0

        def check_host() -> int:
            self.checks += 1
            return host_status

        self.status = install(request, driver, check_host, out=self.lines.append)
        self.output = "\n".join(self.lines)


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    """A stand-in for the installed plugin that prints its arguments, one per line."""
    path = tmp_path / "a venv's bin" / "nomad-driver-vm"
    path.parent.mkdir()
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    path = tmp_path / "nomad.d"
    path.mkdir()
    return path


def request_for(tmp_path: Path, config_dir: Path | None, **changes: object) -> InstallRequest:
    values: dict[str, object] = {
        "plugin_dir": tmp_path / "plugins",
        "config_file": None if config_dir is None else config_dir / CONFIG_FILE_NAME,
        "image_paths": (Path("/srv/vm-images"),),
        "data_dir": Path("/var/lib/nomad-vm"),
    }
    values.update(changes)
    return InstallRequest(**values)  # type: ignore[arg-type]


def test_the_wrapper_runs_the_installed_plugin_with_nomads_arguments(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    run = Run(request_for(tmp_path, config_dir), driver)
    assert run.status == 0, run.output
    wrapper = tmp_path / "plugins" / "nomad-driver-vm"
    assert os.access(wrapper, os.X_OK)
    assert wrapper.read_text().startswith("#!/bin/sh\nexec ")
    # Run it as Nomad would: the arguments (even with spaces) reach the plugin unchanged.
    result = subprocess.run([str(wrapper), "one arg", "two"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "one arg\ntwo\n"


def test_the_plugin_block_goes_into_the_config_dir(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    request = request_for(
        tmp_path,
        config_dir,
        image_paths=(Path("/srv/vm-images"), Path("/data/images")),
        accelerator="tcg",
    )
    run = Run(request, driver)
    assert run.status == 0, run.output
    text = (config_dir / CONFIG_FILE_NAME).read_text()
    assert 'plugin "nomad-driver-vm" {\n  config {\n' in text
    assert 'image_paths = ["/srv/vm-images", "/data/images"]\n' in text
    assert 'accelerator = "tcg"\n' in text
    assert 'data_dir    = "/var/lib/nomad-vm"\n' in text
    assert (config_dir / CONFIG_FILE_NAME).stat().st_mode & 0o777 == 0o644


def test_without_a_config_location_the_block_is_printed(tmp_path: Path, driver: Path) -> None:
    run = Run(request_for(tmp_path, None), driver)
    assert run.status == 0, run.output
    assert 'plugin "nomad-driver-vm" {' in run.output
    assert 'image_paths = ["/srv/vm-images"]' in run.output
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "nomad-driver-vm",
        "nomad-driver-vm",  # the stand-in driver and the wrapper; no config file
    ]


def test_a_second_run_changes_nothing(tmp_path: Path, driver: Path, config_dir: Path) -> None:
    request = request_for(tmp_path, config_dir)
    Run(request, driver)
    written = [tmp_path / "plugins" / "nomad-driver-vm", config_dir / CONFIG_FILE_NAME]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in written]
    again = Run(request, driver)
    assert again.status == 0, again.output
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in written] == before
    assert again.output.count("already up to date") == 2


def test_a_different_file_is_not_replaced_without_force(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    Run(request_for(tmp_path, config_dir), driver)
    config = config_dir / CONFIG_FILE_NAME
    operators_own = config.read_text().replace("/var/lib/nomad-vm", "/srv/nomad-vm-data")
    config.write_text(operators_own)
    wrapper = tmp_path / "plugins" / "nomad-driver-vm"
    other_driver = tmp_path / "other" / "nomad-driver-vm"

    refused = Run(request_for(tmp_path, config_dir), other_driver)
    assert refused.status == 1
    assert f"FAIL  {config} exists with other content; pass --force" in refused.output
    assert f"FAIL  {wrapper} exists with other content" in refused.output
    assert '-    data_dir    = "/srv/nomad-vm-data"' in refused.output  # the diff
    assert "nothing was written" in refused.output
    assert config.read_text() == operators_own
    assert wrapper.read_text() == wrapper_script(driver)
    assert refused.checks == 0

    forced = Run(request_for(tmp_path, config_dir, force=True), other_driver)
    assert forced.status == 0, forced.output
    assert f"replaced {config}" in forced.output
    assert '"/var/lib/nomad-vm"' in config.read_text()
    assert wrapper.read_text() == wrapper_script(other_driver)


def test_a_wrapper_that_lost_its_execute_bit_gets_it_back(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    Run(request_for(tmp_path, config_dir), driver)
    wrapper = tmp_path / "plugins" / "nomad-driver-vm"
    wrapper.chmod(0o644)
    run = Run(request_for(tmp_path, config_dir), driver)
    assert run.status == 0, run.output
    assert f"fixed mode of {wrapper}" in run.output
    assert wrapper.stat().st_mode & 0o777 == 0o755


def test_a_missing_config_dir_is_refused_and_nothing_is_written(
    tmp_path: Path, driver: Path
) -> None:
    run = Run(request_for(tmp_path, tmp_path / "no-such-dir"), driver)
    assert run.status == 1
    assert "is not a directory: give the directory your agent reads" in run.output
    assert not (tmp_path / "plugins").exists()


def test_a_config_the_plugin_would_refuse_is_refused(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    run = Run(request_for(tmp_path, config_dir, data_dir=Path("relative")), driver)
    assert run.status == 1
    assert "config.data_dir: must be an absolute path" in run.output
    assert not (config_dir / CONFIG_FILE_NAME).exists()


def test_the_host_check_runs_and_decides_the_exit_status(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    run = Run(request_for(tmp_path, config_dir), driver, host_status=1)
    assert run.checks == 1
    assert run.status == 1
    assert (config_dir / CONFIG_FILE_NAME).exists()  # the files are still written


def test_the_operator_is_told_what_else_the_agent_needs(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    run = Run(request_for(tmp_path, config_dir), driver)
    assert "telemetry { publish_allocation_metrics = true }" in run.output
    assert f'plugin_dir = "{tmp_path / "plugins"}"' in run.output
    assert "warn  image path /srv/vm-images does not exist yet" in run.output


def test_another_plugin_block_in_the_config_dir_is_pointed_out(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    (config_dir / "client.hcl").write_text('plugin "nomad-driver-vm" {\n  config {}\n}\n')
    (config_dir / "server.hcl").write_text("server { enabled = true }\n")
    run = Run(request_for(tmp_path, config_dir), driver)
    assert f"warn  {config_dir / 'client.hcl'} also has a plugin" in run.output
    assert "server.hcl" not in run.output


def test_the_installed_driver_is_the_one_of_this_environment() -> None:
    assert installed_driver() == Path(sys.executable).parent / "nomad-driver-vm"


def test_the_command_line(
    tmp_path: Path,
    config_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checked: list[tuple[str, str]] = []

    def fake_doctor(qemu_binary: str, accelerator: str, bridge: str | None = None) -> int:
        checked.append((qemu_binary, accelerator))
        return 0

    monkeypatch.setattr(doctor, "run_doctor", fake_doctor)
    monkeypatch.chdir(tmp_path)
    argv = ["install", "--plugin-dir", "plugins", "--config-dir", "nomad.d"]
    argv += ["--image-path", "images", "--image-path", "/srv/vm-images", "--accelerator", "tcg"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0, capsys.readouterr().out
    assert checked == [("qemu-system-x86_64", "tcg")]
    text = (config_dir / CONFIG_FILE_NAME).read_text()
    assert f'image_paths = ["{tmp_path / "images"}", "/srv/vm-images"]' in text  # made absolute
    assert (tmp_path / "plugins" / "nomad-driver-vm").read_text() == wrapper_script(
        installed_driver()
    )

    with pytest.raises(SystemExit) as exited:
        main(["install", "--plugin-dir", "p", "--config-dir", "d", "--config", "f.hcl"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_vms_account_is_made_before_the_host_check(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    made: list[str] = []

    def account() -> list[str]:
        made.append("yes")
        return ["created system user nomad-vm"]

    lines: list[str] = []
    status = install(
        request_for(tmp_path, config_dir), driver, lambda: 0, lines.append, make_account=account
    )
    assert (status, made) == (0, ["yes"])
    assert "ok    created system user nomad-vm" in lines
    assert lines.index("ok    created system user nomad-vm") < lines.index(
        "==> checking this host (`nomad-vm doctor`)"
    )


def test_an_account_that_cannot_be_made_fails_the_install(
    tmp_path: Path, driver: Path, config_dir: Path
) -> None:
    def account() -> list[str]:
        raise AccountError("useradd is not installed (Debian package passwd)")

    lines: list[str] = []
    status = install(
        request_for(tmp_path, config_dir), driver, lambda: 0, lines.append, make_account=account
    )
    assert status == 1
    assert "FAIL  useradd is not installed (Debian package passwd)" in lines

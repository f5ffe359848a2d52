"""Cloud-init options on a VM that gets no cloud-init seed are refused, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm import schema
from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.driver.startup import render_seed
from nomad_vm.errors import ConfigError
from tests.unit.tasks import unit_task

# One value per option that only cloud-init applies.
GIVEN: dict[str, object] = {
    "default_user_password": "secret",
    "default_user_authorized_ssh_key": "ssh-ed25519 AAAAC3Nza me@host",
    "cmds": ["echo hi"],
    "timezone": "Europe/Berlin",
    "user_data": "#cloud-config\npackages: [nginx]\n",
}


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    path = tmp_path / "t"
    path.mkdir()
    (path / "vmlinux").write_bytes(b"k")
    (path / "disk.qcow2").write_bytes(b"d")
    return path


def parse(alloc_dir: Path, driver_config: dict[str, object]):  # type: ignore[no-untyped-def]
    task = unit_task(alloc_dir, driver_config)
    plugin = parse_plugin_config({"data_dir": str(alloc_dir / "data")})
    return task, parse_task_config(task, plugin)


def test_the_option_list_matches_the_schema() -> None:
    names = {f.name for f in schema.TASK_CONFIG.fields}
    assert set(schema.CLOUD_INIT_OPTIONS) <= names
    assert set(GIVEN) == set(schema.CLOUD_INIT_OPTIONS)
    assert "hostname" not in schema.CLOUD_INIT_OPTIONS  # also QEMU's -name and the DHCP entry


@pytest.mark.parametrize("option", sorted(GIVEN))
def test_a_kernel_only_vm_refuses_each_cloud_init_option(task_dir: Path, option: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(task_dir.parent, {"kernel": "vmlinux", option: GIVEN[option]})
    assert err.value.field == f"config.{option}"
    reason = err.value.reason
    assert "only takes effect through cloud-init" in reason
    assert "gets no cloud-init seed because it boots a kernel without a disk image" in reason
    assert f"remove {option}, or boot from an `image` that has cloud-init" in reason
    # The plaintext password never appears in an error (errors become task events).
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("option", sorted(GIVEN))
def test_cloud_init_false_refuses_each_cloud_init_option(task_dir: Path, option: str) -> None:
    config = {"image": "disk.qcow2", "cloud_init": False, option: GIVEN[option]}
    with pytest.raises(ConfigError) as err:
        parse(task_dir.parent, config)
    assert err.value.field == f"config.{option}"
    assert "because cloud_init = false" in err.value.reason
    assert f"remove {option}, or set cloud_init = true" in err.value.reason


def test_several_options_are_named_together(task_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse(task_dir.parent, {"kernel": "vmlinux", "timezone": "UTC", "cmds": ["true"]})
    # Schema order: cmds comes first, the others are named in the same message.
    assert err.value.field == "config.cmds"
    assert "cloud-init (as do timezone), and" in err.value.reason
    with pytest.raises(ConfigError) as err:
        parse(task_dir.parent, {"kernel": "vmlinux", **GIVEN})
    assert err.value.field == "config.default_user_password"
    assert (
        "(as do default_user_authorized_ssh_key, cmds, timezone and user_data)" in err.value.reason
    )


@pytest.mark.parametrize(
    "config",
    [
        {"kernel": "vmlinux", "hostname": "web-1"},  # hostname has uses beyond cloud-init
        {"kernel": "vmlinux", "cmds": [], "user_data": ""},  # empty means unset
        {"image": "disk.qcow2", "cloud_init": False, "hostname": "web-1"},
    ],
)
def test_vms_without_a_seed_accept_what_has_an_effect(
    task_dir: Path, config: dict[str, object]
) -> None:
    task, vm = parse(task_dir.parent, config)
    assert not vm.gets_seed
    assert render_seed(task, vm) is None


@pytest.mark.parametrize(
    "boot", [{"image": "disk.qcow2"}, {"image": "disk.qcow2", "kernel": "vmlinux"}]
)
def test_vms_with_a_seed_take_every_cloud_init_option(
    task_dir: Path, boot: dict[str, object]
) -> None:
    task, vm = parse(task_dir.parent, {**boot, **GIVEN})
    assert vm.gets_seed
    seed = render_seed(task, vm)
    assert seed is not None and "timezone: Europe/Berlin" in seed.user_data

"""Pure driver-layer logic: resources, the path allowlist, exit mapping, config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.driver.resources import count_cpuset, memory_mb_for, vcpus_for
from nomad_vm.driver.task import exit_result_from
from nomad_vm.driver.types import AgentInfo, TaskConfig, TaskResources
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.storage.paths import resolve_allowed_file
from nomad_vm.vm.spec import VMExit
from tests.unit.tasks import unit_task


@pytest.mark.parametrize(("cpuset", "n"), [("0", 1), ("0,1", 2), ("0-3", 4), ("0-1,4,6-7", 5)])
def test_count_cpuset(cpuset: str, n: int) -> None:
    assert count_cpuset(cpuset) == n


def test_vcpus_from_reserved_cores_win() -> None:
    res = TaskResources(cpu_mhz=100, memory_mb=128, cpuset_cpus="2-3")
    assert vcpus_for(res, AgentInfo(core_mhz=2000, core_count=8)) == 2


@pytest.mark.parametrize(("mhz", "vcpus"), [(0, 1), (100, 1), (2000, 1), (2001, 2), (9000, 4)])
def test_vcpus_from_mhz_round_up_and_clamp(mhz: int, vcpus: int) -> None:
    res = TaskResources(cpu_mhz=mhz, memory_mb=128)
    assert vcpus_for(res, AgentInfo(core_mhz=2000, core_count=4)) == vcpus


def test_memory_too_small_names_resources_memory() -> None:
    with pytest.raises(ConfigError) as err:
        memory_mb_for(TaskResources(cpu_mhz=100, memory_mb=16))
    assert err.value.field == "resources.memory"


def test_allowlist_resolves_symlinks_and_dotdot(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "vmlinux").write_bytes(b"k")
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.symlink(secret, allowed / "link")
    assert resolve_allowed_file("config.kernel", str(allowed / "vmlinux"), [str(allowed)], "/")
    for sneaky in (str(allowed / "link"), str(allowed / ".." / "secret")):
        with pytest.raises(ImageError) as err:
            resolve_allowed_file("config.kernel", sneaky, [str(allowed)], "/")
        assert err.value.field == "config.kernel"
        assert "outside the allowed directories" in err.value.reason


def test_allowlist_relative_paths_are_task_dir_relative(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "k").write_bytes(b"k")
    found = resolve_allowed_file("config.kernel", "local/k", [str(tmp_path)], str(tmp_path))
    assert found == tmp_path / "local" / "k"
    with pytest.raises(ImageError, match="no such file"):
        resolve_allowed_file("config.kernel", "local/missing", [str(tmp_path)], str(tmp_path))


def _task(alloc_dir: Path, driver_config: dict[str, object] | None) -> TaskConfig:
    return unit_task(alloc_dir, driver_config)


def test_task_config_requires_something_to_boot_and_checks_paths(tmp_path: Path) -> None:
    plugin = parse_plugin_config({"data_dir": str(tmp_path / "data")})
    with pytest.raises(ConfigError) as err:
        parse_task_config(_task(tmp_path, {"kernel": None}), plugin)
    assert err.value.field == "config.image" and "kernel" in err.value.reason
    with pytest.raises(ConfigError) as err:
        parse_task_config(_task(tmp_path, {"image": "x", "initramfs": "y"}), plugin)
    assert err.value.field == "config.initramfs"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vmlinux").write_bytes(b"k")
    cfg = parse_task_config(_task(tmp_path, {"kernel": "vmlinux"}), plugin)
    assert cfg.kernel == tmp_path / "t" / "vmlinux"
    assert cfg.initramfs is None and cfg.image is None
    assert cfg.cmdline == "console=ttyS0"
    # An unset machine is the hypervisor's default, filled in by plan_start.
    assert (cfg.firmware, cfg.machine, cfg.arch, cfg.hypervisor) == ("bios", "", "x86_64", None)
    assert cfg.use_thin_copy is True
    assert cfg.hostname == "t-a"  # task name + alloc id prefix


@pytest.mark.parametrize("bad", ["-web", "web_1", "a" * 64, "web.example", ""])
def test_hostname_must_be_an_rfc1123_label(tmp_path: Path, bad: str) -> None:
    plugin = parse_plugin_config({"data_dir": str(tmp_path / "data")})
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "k").write_bytes(b"k")
    if not bad:
        return  # empty means "use the default"
    with pytest.raises(ConfigError) as err:
        parse_task_config(_task(tmp_path, {"kernel": "k", "hostname": bad}), plugin)
    assert err.value.field == "config.hostname"


def test_default_hostnames_are_valid_labels() -> None:
    from nomad_vm.driver.hostname import default_hostname

    assert default_hostname("Web_Server", "0123abcd-ef") == "web-server-0123abcd"
    assert default_hostname("___", "9f") == "vm-9f"
    assert len(default_hostname("x" * 100, "0123456789")) <= 63


def test_os_block_arrives_as_a_list_from_nomad(tmp_path: Path) -> None:
    plugin = parse_plugin_config({"data_dir": str(tmp_path / "data")})
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "k").write_bytes(b"k")
    cfg = parse_task_config(
        _task(tmp_path, {"kernel": "k", "os": [{"arch": None, "machine": "q35"}]}), plugin
    )
    assert cfg.machine == "q35"
    with pytest.raises(ConfigError) as err:
        parse_task_config(_task(tmp_path, {"kernel": "k", "os": {"machine": "virt"}}), plugin)
    assert err.value.field == "config.os.machine"


def test_plugin_config_rejects_relative_paths() -> None:
    with pytest.raises(ConfigError) as err:
        parse_plugin_config({"image_paths": ["relative/dir"]})
    assert err.value.field == "config.image_paths[0]"
    with pytest.raises(ConfigError) as err:
        parse_plugin_config({"data_dir": "data"})
    assert err.value.field == "config.data_dir"


def test_exit_results() -> None:
    assert exit_result_from(VMExit(0, None, "ok"), False).successful
    crashed = exit_result_from(VMExit(1, None, "QEMU exited with status 1: boom"), False)
    assert crashed.exit_code == 1 and "boom" in crashed.err
    killed = exit_result_from(VMExit(None, 9, "killed by SIGKILL"), False)
    assert (killed.exit_code, killed.signal) == (137, 9) and "SIGKILL" in killed.err
    stopped = exit_result_from(VMExit(None, 15, "killed by SIGTERM"), True)
    assert stopped.signal == 15 and stopped.err == ""


def test_guest_memory_from_balloon_stats() -> None:
    from nomad_vm.vm.qemu.running import guest_used_bytes

    reply = {
        "last-update": 5,
        "stats": {"stat-total-memory": 1000, "stat-available-memory": 300, "stat-free-memory": 100},
    }
    assert guest_used_bytes(reply) == 700
    no_available = {
        "last-update": 5,
        "stats": {"stat-total-memory": 1000, "stat-available-memory": -1, "stat-free-memory": 100},
    }
    assert guest_used_bytes(no_available) == 900
    assert guest_used_bytes({"last-update": 0, "stats": {}}) is None  # no report yet
    assert guest_used_bytes({"last-update": 5, "stats": {"stat-total-memory": -1}}) is None


def test_guest_memory_says_when_the_guest_reported() -> None:
    from nomad_vm.vm.hypervisor import GuestMemory
    from nomad_vm.vm.qemu.hotplug_memory import guest_memory_from

    reply = {
        "last-update": 1765000000,
        "stats": {"stat-total-memory": 1000, "stat-available-memory": 300},
    }
    assert guest_memory_from(reply) == GuestMemory(1000, 300, reported_at=1765000000.0)


def test_stats_measured_fields_follow_what_was_measured() -> None:
    from nomad_vm.driver.stats import CpuRate
    from nomad_vm.vm.hypervisor import VMUsage

    rate = CpuRate(2000)
    first = rate.sample("t", VMUsage(1.0, 0.5, 100))
    assert first.cpu.measured == () and first.memory.measured == ("RSS",)
    second = rate.sample("t", VMUsage(2.0, 0.5, 100), guest_used=50)
    assert set(second.cpu.measured) == {"USER_MODE", "SYSTEM_MODE", "PERCENT", "TOTAL_TICKS"}
    assert second.memory.measured == ("RSS", "USAGE") and second.memory.usage == 50
    assert second.cpu.percent > 0 and second.cpu.total_ticks == second.cpu.percent / 100 * 2000

"""Which hypervisor a task gets, the plugin's per-hypervisor settings (the seed's
`cloud_hypervisor {}` block as written), and refusals decided from a backend's declared
capabilities (a backend with Cloud Hypervisor's limits, built from the fake: no knowledge of
backend names in the driver is needed for any of these)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nomad_vm.driver.backend_options import host_settings
from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.fingerprint import fingerprint
from nomad_vm.driver.startup import StartPlan, plan_start
from nomad_vm.driver.types import AgentInfo, Health
from nomad_vm.errors import ConfigError
from nomad_vm.vm.cloud_hypervisor import backend as ch_backend
from nomad_vm.vm.registry import HypervisorRegistry
from tests.fakes.hypervisor import FakeHost, FakeHypervisor
from tests.unit.tasks import unit_task

# The seed's block (nomad-driver-ch README), with its string "true" for seccomp.
SEED_BLOCK = {
    "bin": "/usr/bin/cloud-hypervisor",
    "remote_bin": "/usr/bin/ch-remote",
    "virtiofsd_bin": "/usr/bin/virtiofsd",
    "default_kernel": "/boot/vmlinuz",
    "default_initramfs": "/boot/initramfs.img",
    "firmware": "/usr/share/qemu/OVMF.fd",
    "seccomp": "true",
    "log_file": "/var/log/cloud-hypervisor.log",
}


class Qemu(FakeHypervisor):
    name = "qemu"


class KvmOnly(FakeHypervisor):
    """The fake with Cloud Hypervisor's declared capabilities (the backend's own value)."""

    name = "cloud-hypervisor"
    capabilities = ch_backend.CAPABILITIES


def registry() -> HypervisorRegistry:
    host = FakeHost()
    return HypervisorRegistry(
        {"qemu": lambda: Qemu(host), "cloud-hypervisor": lambda: KvmOnly(host)},
        default="qemu",
    )


def test_the_seed_block_is_accepted_as_written(tmp_path: Path) -> None:
    config = parse_plugin_config({"data_dir": str(tmp_path), "cloud_hypervisor": SEED_BLOCK})
    ch = config.cloud_hypervisor
    assert (ch.bin, ch.seccomp, ch.trust_kvm) == ("/usr/bin/cloud-hypervisor", "true", False)
    assert ch.default_kernel == Path("/boot/vmlinuz")
    settings = host_settings(config, "cloud-hypervisor")
    assert settings.binary == "/usr/bin/cloud-hypervisor"
    assert settings.virtiofsd_binary == "/usr/bin/virtiofsd"
    assert settings.firmware_file == Path("/usr/share/qemu/OVMF.fd")
    assert settings.field_of("binary") == "cloud_hypervisor.bin"
    # QEMU keeps its own names.
    assert host_settings(config, "qemu").binary == "qemu-system-x86_64"
    assert host_settings(config, "qemu").field_of("binary") == "qemu_binary"


@pytest.mark.parametrize(
    ("block", "field", "reason"),
    [
        ({"seccomp": "yes"}, "config.cloud_hypervisor.seccomp", "one of true, false, log"),
        ({"default_kernel": "vmlinuz"}, "config.cloud_hypervisor.default_kernel", "absolute"),
        ({"default_initramfs": "/i.img"}, "config.cloud_hypervisor.default_initramfs", "needs"),
        ({"vfio": {}}, "config.cloud_hypervisor.vfio", "unknown option"),
    ],
)
def test_bad_block_values_name_the_field(
    tmp_path: Path, block: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_plugin_config({"data_dir": str(tmp_path), "cloud_hypervisor": block})
    assert caught.value.field == field and reason in caught.value.reason


def _plan(tmp_path: Path, options: dict[str, object], plugin: dict[str, object]) -> StartPlan:
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in ("vmlinux", "disk.raw"):
        (tmp_path / "images" / name).write_bytes(b"x")
    config = parse_plugin_config(
        {"data_dir": str(tmp_path / "data"), "image_paths": [str(tmp_path / "images")], **plugin}
    )
    task = unit_task(tmp_path / "alloc", {"share_task_dirs": False, **options})
    run = tmp_path / "run"
    return asyncio.run(plan_start(task, config, AgentInfo(), run, registry()))


KERNEL = "images/vmlinux"


def test_the_task_hypervisor_wins_over_the_plugin_default(tmp_path: Path) -> None:
    kernel = str(tmp_path / KERNEL)
    assert _plan(tmp_path, {"kernel": kernel}, {}).backend.name == "qemu"
    ch = {"hypervisor": "cloud-hypervisor"}
    assert _plan(tmp_path, {"kernel": kernel}, ch).backend.name == "cloud-hypervisor"
    chosen = _plan(tmp_path, {"kernel": kernel, "hypervisor": "qemu"}, ch)
    assert chosen.backend.name == "qemu"
    # An unset machine is the chosen hypervisor's own default.
    assert chosen.vm_plan.request.machine == "pc"
    plan = _plan(tmp_path, {"kernel": kernel}, ch)
    assert plan.vm_plan.request.machine == "cloud-hypervisor"


@pytest.mark.parametrize(
    ("options", "plugin", "field", "says"),
    [
        # BIOS boot of a disk: the backend declares no disk-booting BIOS.
        ({"image": "images/disk.raw"}, {}, "config.firmware", "cannot boot a disk"),
        ({"kernel": KERNEL, "os": {"machine": "pc"}}, {}, "config.os.machine", "'pc' is not"),
        ({"kernel": KERNEL, "firmware": "uefi-secure"}, {}, "config.firmware", "uefi-secure"),
        ({"kernel": KERNEL}, {"accelerator": "tcg"}, "accelerator", "'tcg' is not available"),
        (
            {"kernel": KERNEL},
            {"share_transport": "9p"},
            "config.share_transport",
            "'9p' is not available",
        ),
        # Signals to a guest unit go through the guest agent, which a CH guest gets only from
        # the cloud-init seed (it listens on vsock); a kernel-booted VM has none.
        ({"kernel": KERNEL, "signal_unit": "app.service"}, {}, "config.signal_unit", "no seed"),
        # CH opens TAPs by name through /dev/net/tun; a macvtap is a /dev/tapN descriptor.
        (
            {"kernel": KERNEL, "network_interface": {"macvtap": {"device": "eth0"}}},
            {},
            "config.network_interface.macvtap",
            "cannot take a macvtap",
        ),
    ],
)
def test_what_the_backend_cannot_do_names_the_option(
    tmp_path: Path,
    options: dict[str, object],
    plugin: dict[str, object],
    field: str,
    says: str,
) -> None:
    absolute = {k: str(tmp_path / v) if k in ("image", "kernel") else v for k, v in options.items()}
    with pytest.raises(ConfigError) as caught:
        _plan(tmp_path, {"hypervisor": "cloud-hypervisor", **absolute}, plugin)
    assert caught.value.field == field
    assert says in caught.value.reason and "cloud-hypervisor" in caught.value.reason


def test_a_disk_boots_with_uefi_or_the_default_kernel(tmp_path: Path) -> None:
    disk = {"hypervisor": "cloud-hypervisor", "image": str(tmp_path / "images/disk.raw")}
    assert _plan(tmp_path, {**disk, "firmware": "uefi"}, {}).vm_plan.request.kernel is None
    block = {"cloud_hypervisor": {"default_kernel": "/boot/vmlinuz"}}
    request = _plan(tmp_path, disk, block).vm_plan.request
    assert request.kernel == Path("/boot/vmlinuz") and request.initramfs is None
    # A task that asks its firmware to boot the disk does not get the default kernel.
    request = _plan(tmp_path, {**disk, "firmware": "uefi"}, block).vm_plan.request
    assert request.kernel is None
    # The default initramfs comes with the default kernel.
    ramdisk = {"default_kernel": "/boot/vmlinuz", "default_initramfs": "/boot/initrd.img"}
    request = _plan(tmp_path, disk, {"cloud_hypervisor": ramdisk}).vm_plan.request
    assert request.kernel == Path("/boot/vmlinuz")
    assert request.initramfs == Path("/boot/initrd.img")


def test_a_hypervisor_the_plugin_lacks_is_named(tmp_path: Path) -> None:
    config = parse_plugin_config({"data_dir": str(tmp_path / "data")})
    only_fake = HypervisorRegistry({"fake": lambda: FakeHypervisor(FakeHost())}, default="fake")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vmlinux").write_bytes(b"x")
    task = unit_task(tmp_path, {"kernel": "vmlinux", "hypervisor": "cloud-hypervisor"})
    with pytest.raises(ConfigError) as caught:
        asyncio.run(plan_start(task, config, AgentInfo(), tmp_path / "run", only_fake))
    assert caught.value.field == "config.hypervisor"


def test_fingerprint_says_for_every_backend_whether_it_can_run(tmp_path: Path) -> None:
    reg = registry()
    config = parse_plugin_config({"data_dir": str(tmp_path)})  # accelerator auto: TCG here
    found = fingerprint(config, reg.get("qemu"), [reg.get("cloud-hypervisor")])
    assert found.health == Health.HEALTHY
    assert found.attributes["driver.vm.qemu.usable"] is True
    assert found.attributes["driver.vm.cloud_hypervisor.usable"] is True
    tcg = parse_plugin_config({"data_dir": str(tmp_path), "accelerator": "tcg"})
    found = fingerprint(tcg, reg.get("qemu"), [reg.get("cloud-hypervisor")])
    assert found.health == Health.HEALTHY  # the default backend can
    assert found.attributes["driver.vm.cloud_hypervisor.usable"] is False
    reason = found.attributes["driver.vm.cloud_hypervisor.reason"]
    assert isinstance(reason, str) and reason.startswith("accelerator: 'tcg' is not available")

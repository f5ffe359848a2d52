"""`os { variant }`, the options it stands for, the plugin's default firmware, `seed_files` and
the seed ISO that carries them: validation and what each choice becomes (no QEMU here)."""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import pytest

from nomad_vm.cloudinit.seed import build_iso
from nomad_vm.driver.config import VMTaskConfig, parse_plugin_config, parse_task_config
from nomad_vm.driver.guest_profile import WINDOWS_VARIANTS, GuestProfile
from nomad_vm.driver.seed_files import read_seed_files
from nomad_vm.driver.startup import refuse_pvh_kernel_with_tpm
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.storage.held import FileHolder, open_own
from nomad_vm.storage.paths import Allowlist
from nomad_vm.vm.hyperv import RECOMMENDED, choose_hyperv
from tests.unit.tasks import unit_task
from tests.unit.test_hypervisor_choice import _plan


def parse(tmp_path: Path, options: dict[str, object], **plugin: object) -> VMTaskConfig:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "disk.qcow2").write_bytes(b"x")
    config = parse_plugin_config({"image_paths": [str(images)], **plugin})
    task = unit_task(tmp_path / "alloc", {"image": str(images / "disk.qcow2"), **options})
    return parse_task_config(task, config)


def refused(tmp_path: Path, options: dict[str, object], **plugin: object) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, options, **plugin)
    return err.value


@pytest.mark.parametrize("variant", WINDOWS_VARIANTS)
def test_a_windows_variant_switches_on_everything_windows_needs(
    tmp_path: Path, variant: str
) -> None:
    vm = parse(tmp_path, {"os": {"variant": variant}})
    assert vm.profile == GuestProfile(
        variant=variant,
        default_machine="q35",
        firmware="uefi-secure",
        tpm=True,
        hyperv=True,
        rtc_localtime=True,
        nic_model="e1000e",
        disk_bus="sata",
        seed_cdrom=True,
        display="vga",
    )
    assert vm.firmware == "uefi-secure" and vm.disks[0].bus == "sata"
    assert vm.display == "vga"
    assert vm.profile.machine_on(("pc", "q35", "microvm")) == "q35"


def test_the_tasks_own_options_win_over_the_variant(tmp_path: Path) -> None:
    vm = parse(
        tmp_path,
        {
            "os": {"variant": "win2k22", "machine": "q35"},
            "tpm": False,
            "hyperv": False,
            "rtc": "utc",
            "firmware": "uefi",
            "network_interface": {"bridge": {}, "model": "virtio"},
            "display": "none",
        },
    )
    profile = vm.profile
    assert (profile.tpm, profile.hyperv, profile.rtc_localtime) == (False, False, False)
    assert vm.display == "none"
    assert (vm.firmware, profile.nic_model, vm.machine) == ("uefi", "virtio", "q35")


def test_each_piece_alone_without_a_variant(tmp_path: Path) -> None:
    vm = parse(
        tmp_path,
        {"tpm": True, "rtc": "localtime", "network_interface": {"bridge": {}, "model": "e1000e"}},
    )
    profile = vm.profile
    assert (profile.tpm, profile.rtc_localtime, profile.nic_model) == (True, True, "e1000e")
    assert (profile.hyperv, vm.firmware, vm.disks[0].bus, profile.seed_cdrom) == (
        False,
        "bios",
        "virtio",
        False,
    )


@pytest.mark.parametrize("variant", ["ubuntu20.04", "debian12", "rhel9.4", "archlinux"])
def test_a_linux_variant_is_accepted_and_changes_nothing(tmp_path: Path, variant: str) -> None:
    vm = parse(tmp_path, {"os": {"variant": variant}})
    assert vm.profile == GuestProfile(variant=variant)
    assert vm.firmware == "bios" and vm.display == "none"


@pytest.mark.parametrize("variant", ["Windows", "win7", "ubuntu", "freebsd14.0", "macos13"])
def test_an_unknown_variant_is_refused_naming_os_variant(tmp_path: Path, variant: str) -> None:
    err = refused(tmp_path, {"os": {"variant": variant}})
    assert err.field == "config.os.variant" and "windows" in err.reason


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rtc": "local"}, "config.rtc"),
        ({"tpm": "yes"}, "config.tpm"),
        (
            {"network_interface": {"bridge": {}, "model": "rtl8139"}},
            "config.network_interface.model",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_option(
    tmp_path: Path, options: dict[str, object], field: str
) -> None:
    assert refused(tmp_path, options).field == field


def test_the_nodes_default_firmware_brings_q35_and_may_be_overridden(tmp_path: Path) -> None:
    vm = parse(tmp_path, {}, default_firmware="uefi-secure")
    assert (vm.firmware, vm.profile.machine_on(("pc", "q35"))) == ("uefi-secure", "q35")
    # A hypervisor without q35 keeps its own machine (and refuses the firmware itself).
    assert vm.profile.machine_on(("cloud-hypervisor",)) == "cloud-hypervisor"
    assert parse(tmp_path, {"firmware": "bios"}, default_firmware="uefi-secure").firmware == "bios"
    assert parse(tmp_path, {}, default_firmware="uefi").profile.default_machine == ""


def test_a_forbidden_firmware_choice_names_the_option_and_both_plugin_options(
    tmp_path: Path,
) -> None:
    locked = {"default_firmware": "uefi-secure", "allow_task_firmware": False}
    err = refused(tmp_path, {"firmware": "bios"}, **locked)
    assert err.field == "config.firmware"
    assert "default_firmware" in err.reason and "allow_task_firmware = false" in err.reason
    # The same firmware as the node's, spelt out or through the variant, is fine.
    assert parse(tmp_path, {"firmware": "uefi-secure"}, **locked).firmware == "uefi-secure"
    assert parse(tmp_path, {"os": {"variant": "win11"}}, **locked).firmware == "uefi-secure"
    # A variant asking for what a BIOS-only node forbids names the variant.
    bios_only = {"default_firmware": "bios", "allow_task_firmware": False}
    err = refused(tmp_path, {"os": {"variant": "win11"}}, **bios_only)
    assert err.field == "config.os.variant" and "allow_task_firmware" in err.reason


def test_a_machine_that_cannot_run_the_implied_secure_boot_says_where_it_comes_from(
    tmp_path: Path,
) -> None:
    err = refused(tmp_path, {"os": {"machine": "pc"}}, default_firmware="uefi-secure")
    assert err.field == "config.os.machine" and "default_firmware" in err.reason
    err = refused(tmp_path, {"os": {"machine": "pc", "variant": "windows"}})
    assert err.field == "config.os.machine" and "os.variant" in err.reason


def test_cloud_hypervisor_refuses_the_windows_pieces_by_name(tmp_path: Path) -> None:
    kernel = str(tmp_path / "images" / "vmlinux")
    for options, field in (
        ({"tpm": True}, "config.tpm"),
        ({"hyperv": True}, "config.hyperv"),
        ({"rtc": "localtime"}, "config.rtc"),
        (
            {"network_interface": {"bridge": {}, "model": "e1000e"}},
            "config.network_interface.model",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            _plan(tmp_path, {"hypervisor": "cloud-hypervisor", "kernel": kernel, **options}, {})
        assert err.value.field == field and "cloud-hypervisor" in err.value.reason


def test_hyperv_flags_under_kvm_and_all_dropped_under_tcg() -> None:
    assert choose_hyperv(True, "kvm").flags == RECOMMENDED
    tcg = choose_hyperv(True, "tcg")
    assert tcg.flags == () and tcg.dropped == RECOMMENDED
    assert "need KVM" in tcg.event() and "hv-relaxed" in tcg.event()
    assert choose_hyperv(False, "tcg").event() == ""


def test_a_pvh_vmlinux_with_a_tpm_is_refused(tmp_path: Path) -> None:
    with FileHolder() as holder:
        elf = tmp_path / "vmlinux"
        elf.write_bytes(b"\x7fELF" + bytes(60))
        with pytest.raises(ConfigError) as err:
            refuse_pvh_kernel_with_tpm(open_own(elf, holder, writable=False))
        assert err.value.field == "config.tpm" and "PVH" in err.value.reason
        bz = tmp_path / "vmlinuz"
        bz.write_bytes(b"MZ" + bytes(60))
        refuse_pvh_kernel_with_tpm(open_own(bz, holder, writable=False))


def seed_allowlist(tmp_path: Path) -> Allowlist:
    return Allowlist(roots=(str(tmp_path),))


def test_seed_files_are_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "autounattend.xml").write_bytes(b"<unattend/>")
    (tmp_path / "cloudbase-init.conf").write_bytes(b"[DEFAULT]\n")
    files = read_seed_files(
        (tmp_path / "autounattend.xml", tmp_path / "cloudbase-init.conf"), seed_allowlist(tmp_path)
    )
    assert files == (("autounattend.xml", b"<unattend/>"), ("cloudbase-init.conf", b"[DEFAULT]\n"))
    (tmp_path / "user-data").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "autounattend.xml").write_bytes(b"y")
    (tmp_path / "big").write_bytes(bytes(8 * 2**20 + 1))
    for paths, field, says in (
        ((tmp_path / "user-data",), "config.seed_files[0]", "cannot be a seed file name"),
        (
            (tmp_path / "autounattend.xml", tmp_path / "sub" / "autounattend.xml"),
            "config.seed_files[1]",
            "already listed",
        ),
        ((tmp_path / "big",), "config.seed_files[0]", "MiB"),
        ((tmp_path / "autounattend.xml",) * 17, "config.seed_files", "at most 16"),
    ):
        with pytest.raises(ConfigError) as err:
            read_seed_files(paths, seed_allowlist(tmp_path))
        assert err.value.field == field and says in err.value.reason


def test_seed_files_outside_the_allowed_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        parse(tmp_path, {"seed_files": ["/etc/shadow"]})
    assert err.value.field == "config.seed_files[0]"


def iso_names(image: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for name in ("autounattend.xml", "meta-data"):
            out = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            files[name] = out.getvalue()
        return label, files
    finally:
        iso.close()


def test_the_seed_iso_carries_seed_files_with_or_without_cloud_init() -> None:
    from nomad_vm.cloudinit.model import SeedDocuments

    extra = (("autounattend.xml", b"<unattend/>"),)
    label, files = iso_names(build_iso(SeedDocuments("instance-id: x\n", "#cloud-config\n"), extra))
    assert label == "cidata" and files == {
        "autounattend.xml": b"<unattend/>",
        "meta-data": b"instance-id: x\n",
    }
    label, files = iso_names(build_iso(None, extra))
    # Without cloud-init documents the volume is not cidata: cloud-init would take it for one.
    assert label == "nomad-seed" and files == {"autounattend.xml": b"<unattend/>"}

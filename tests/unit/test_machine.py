"""Machine type and firmware: every validation rule, the argv fragments (golden-style), and
firmware discovery through QEMU's descriptors (with fake descriptor directories)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError, VMRequestError
from nomad_vm.storage.held import HeldFile
from nomad_vm.vm import firmware
from nomad_vm.vm.firmware import FirmwarePlan, plan_firmware, prepare_vars
from nomad_vm.vm.machine import MachineConfig, machine_argv, validate_machine
from nomad_vm.vm.qemu.files_argv import FdSets, firmware_argv

CODE = Path("/fw/CODE.fd")
SECURE_CODE = Path("/fw/CODE.secboot.fd")
VARS = Path("/task/dir/uefi-vars.fd")
CODE_FILE = HeldFile(CODE, 40)
VARS_FILE = HeldFile(VARS, 41, writable=True)
UEFI_PLAN = FirmwarePlan("uefi", CODE, Path("/fw/VARS.fd"), False, False, "test")
SECURE_PLAN = FirmwarePlan("uefi-secure", SECURE_CODE, Path("/fw/VARS.ms.fd"), True, True, "test")


def valid(
    machine: str = "pc",
    firmware: str = "bios",
    *,
    arch: str = "x86_64",
    kernel: bool = True,
    disk: bool = False,
) -> MachineConfig:
    return validate_machine(arch, machine, firmware, has_kernel=kernel, has_disk=disk)


def rejected(
    machine: str = "pc",
    firmware: str = "bios",
    *,
    arch: str = "x86_64",
    kernel: bool = True,
    disk: bool = False,
) -> VMRequestError:
    """The error names the request's option; the driver maps it to the config field
    (tests/unit/test_backend_options.py)."""
    with pytest.raises(VMRequestError) as caught:
        valid(machine, firmware, arch=arch, kernel=kernel, disk=disk)
    return caught.value


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "firmware", "expected"),
    [
        ("pc", "bios", MachineConfig("pc", "bios", None)),
        ("pc", "uefi", MachineConfig("pc", "uefi", None)),
        ("q35", "bios", MachineConfig("q35", "bios", False)),
        ("q35", "uefi", MachineConfig("q35", "uefi", False)),
        ("q35", "uefi-secure", MachineConfig("q35", "uefi-secure", True)),
        ("microvm", "bios", MachineConfig("microvm", "bios", None)),
    ],
)
def test_valid_combinations(machine: str, firmware: str, expected: MachineConfig) -> None:
    assert valid(machine, firmware) == expected


def test_x86_64_and_nothing_else_is_accepted() -> None:
    error = rejected(arch="aarch64")
    assert error.option == "arch"
    assert "aarch64" in error.reason


def test_unknown_firmware_and_machine_name_their_fields() -> None:
    assert rejected(firmware="coreboot").option == "firmware"
    assert rejected(machine="isapc").option == "machine"


def test_something_must_be_bootable() -> None:
    assert rejected(kernel=False, disk=False).option == "kernel"
    # Firmware boots from the disk on pc and q35, with any firmware.
    assert valid("pc", "bios", kernel=False, disk=True).machine == "pc"
    assert valid("q35", "uefi-secure", kernel=False, disk=True).smm is True


@pytest.mark.parametrize("firmware", ["uefi", "uefi-secure"])
def test_microvm_has_no_uefi(firmware: str) -> None:
    error = rejected("microvm", firmware)
    assert error.option == "firmware"
    assert "microvm" in error.reason


def test_microvm_only_boots_a_kernel() -> None:
    error = rejected("microvm", "bios", kernel=False, disk=True)
    assert error.option == "machine"
    assert "kernel" in error.reason
    assert valid("microvm", "bios", kernel=True, disk=True).machine == "microvm"


@pytest.mark.parametrize("machine", ["pc"])
def test_secure_boot_needs_q35(machine: str) -> None:
    error = rejected(machine, "uefi-secure")
    assert error.option == "firmware"
    assert "q35" in error.reason and "SMM" in error.reason


# --- argv fragments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (MachineConfig("pc", "bios", None), ["-machine", "pc"]),
        (MachineConfig("q35", "bios", False), ["-machine", "q35,smm=off"]),
        (MachineConfig("microvm", "bios", None), ["-machine", "microvm"]),
    ],
)
def test_bios_argv(cfg: MachineConfig, expected: list[str]) -> None:
    assert machine_argv(cfg, None) == expected


def test_uefi_on_pc_argv() -> None:
    assert machine_argv(valid("pc", "uefi"), UEFI_PLAN) == [
        "-machine", "pc,pflash0=fw-code,pflash1=fw-vars",
    ]  # fmt: skip


def test_uefi_on_q35_argv_turns_smm_off() -> None:
    assert machine_argv(valid("q35", "uefi"), UEFI_PLAN) == [
        "-machine", "q35,smm=off,pflash0=fw-code,pflash1=fw-vars",
    ]  # fmt: skip


def test_uefi_secure_argv() -> None:
    assert machine_argv(valid("q35", "uefi-secure"), SECURE_PLAN) == [
        "-machine", "q35,smm=on,pflash0=fw-code,pflash1=fw-vars",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
    ]  # fmt: skip


def test_flash_images_are_descriptors_code_read_only() -> None:
    argv = firmware_argv(FdSets(), UEFI_PLAN, CODE_FILE, VARS_FILE)
    assert argv[:2] == ["-add-fd", "fd=40,set=1"]
    assert argv[4:6] == ["-add-fd", "fd=41,set=2"]
    code, variables = json.loads(argv[3]), json.loads(argv[7])
    assert (code["node-name"], code["read-only"]) == ("fw-code", True)
    assert code["file"] == {"driver": "file", "filename": "/dev/fdset/1", "read-only": True}
    assert (variables["node-name"], variables["read-only"]) == ("fw-vars", False)
    assert variables["file"]["filename"] == "/dev/fdset/2"


def test_argv_is_pure() -> None:
    cfg = valid("q35", "uefi-secure")
    assert machine_argv(cfg, SECURE_PLAN) == machine_argv(cfg, SECURE_PLAN)


@pytest.mark.parametrize(
    ("cfg", "plan"),
    [
        (MachineConfig("pc", "bios", None), UEFI_PLAN),
        (MachineConfig("pc", "uefi", None), None),
        (MachineConfig("q35", "uefi", False), SECURE_PLAN),
        # An SMM-only firmware build on a machine without SMM would hang in the firmware.
        (MachineConfig("q35", "uefi-secure", False), SECURE_PLAN),
    ],
)
def test_mismatched_arguments_are_programming_errors(
    cfg: MachineConfig, plan: FirmwarePlan | None
) -> None:
    with pytest.raises(ValueError):
        machine_argv(cfg, plan)


@pytest.mark.parametrize(
    ("plan", "code", "variables"),
    [
        (None, CODE_FILE, VARS_FILE),
        (UEFI_PLAN, None, VARS_FILE),
        (UEFI_PLAN, CODE_FILE, None),
        (UEFI_PLAN, VARS_FILE, CODE_FILE),  # writable code, read-only variable store
    ],
)
def test_mismatched_firmware_files_are_programming_errors(
    plan: FirmwarePlan | None, code: HeldFile | None, variables: HeldFile | None
) -> None:
    with pytest.raises(ValueError):
        firmware_argv(FdSets(), plan, code, variables)


# --- firmware discovery ----------------------------------------------------------------------


def descriptor(
    directory: Path,
    name: str,
    code: Path,
    nvram: Path,
    features: list[str],
    machines: list[str],
    arch: str = "x86_64",
) -> Path:
    data = {
        "description": name,
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": str(code), "format": "raw"},
            "nvram-template": {"filename": str(nvram), "format": "raw"},
        },
        "targets": [{"architecture": arch, "machines": machines}],
        "features": features,
        "tags": [],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def ovmf(tmp_path: Path) -> Path:
    """Fake firmware files named like Debian's."""
    files = tmp_path / "OVMF"
    files.mkdir()
    for name in ("CODE.fd", "CODE.secboot.fd", "VARS.fd", "VARS.ms.fd"):
        (files / name).write_bytes(name.encode() * 64)
    return files


def debian_like(directory: Path, ovmf: Path) -> None:
    """The three descriptors Debian's ovmf package ships, with fake files."""
    both = ["pc-i440fx-*", "pc-q35-*"]
    secure = ["acpi-s3", "requires-smm", "secure-boot"]
    descriptor(
        directory,
        "40-secure-enrolled.json",
        ovmf / "CODE.secboot.fd",
        ovmf / "VARS.ms.fd",
        [*secure, "enrolled-keys"],
        ["pc-q35-*"],
    )
    descriptor(
        directory,
        "50-secure.json",
        ovmf / "CODE.secboot.fd",
        ovmf / "VARS.fd",
        secure,
        ["pc-q35-*"],
    )
    descriptor(directory, "60-plain.json", ovmf / "CODE.fd", ovmf / "VARS.fd", ["acpi-s3"], both)


def test_bios_needs_no_plan(tmp_path: Path) -> None:
    assert plan_firmware("bios", descriptor_dirs=(tmp_path,)) is None


def test_unknown_kind_is_an_error_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(VMRequestError) as caught:
        plan_firmware("efi", descriptor_dirs=(tmp_path,))
    assert caught.value.option == "firmware"


def test_descriptors_choose_the_files(tmp_path: Path, ovmf: Path) -> None:
    shipped = tmp_path / "share"
    debian_like(shipped, ovmf)
    uefi = plan_firmware("uefi", descriptor_dirs=(shipped,))
    secure = plan_firmware("uefi-secure", descriptor_dirs=(shipped,))
    assert uefi == FirmwarePlan(
        "uefi", ovmf / "CODE.fd", ovmf / "VARS.fd", False, False, str(shipped / "60-plain.json")
    )
    # Secure Boot on from the start: the descriptor with enrolled keys, not the empty store.
    assert secure == FirmwarePlan(
        "uefi-secure",
        ovmf / "CODE.secboot.fd",
        ovmf / "VARS.ms.fd",
        True,
        True,
        str(shipped / "40-secure-enrolled.json"),
    )


def test_admin_descriptors_override_and_mask(tmp_path: Path, ovmf: Path) -> None:
    shipped, admin = tmp_path / "share", tmp_path / "etc"
    debian_like(shipped, ovmf)
    (ovmf / "MY_VARS.fd").write_bytes(b"v" * 64)
    descriptor(admin, "60-plain.json", ovmf / "CODE.fd", ovmf / "MY_VARS.fd", [], ["pc-*", "pc-q*"])
    plan = plan_firmware("uefi", descriptor_dirs=(shipped, admin))
    assert plan is not None and plan.vars_template == ovmf / "MY_VARS.fd"
    # An empty file hides the shipped descriptor of that name.
    (admin / "40-secure-enrolled.json").write_text("")
    monkey_fallback = tmp_path / "no-ovmf"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(firmware, "_OVMF_DIR", monkey_fallback)
        with pytest.raises(HypervisorError):
            plan_firmware("uefi-secure", descriptor_dirs=(shipped, admin))


def test_unusable_descriptors_are_skipped(tmp_path: Path, ovmf: Path) -> None:
    found = tmp_path / "fw"
    both = ["pc-i440fx-*", "pc-q35-*"]
    code, nvram = ovmf / "CODE.fd", ovmf / "VARS.fd"
    descriptor(found, "10-arm.json", code, nvram, [], ["virt-*"], arch="aarch64")
    descriptor(found, "11-q35-only.json", code, nvram, [], ["pc-q35-*"])
    descriptor(found, "12-missing.json", ovmf / "nope.fd", nvram, [], both)
    descriptor(found, "13-smm.json", code, nvram, ["requires-smm"], both)
    qcow2 = descriptor(found, "14-qcow2.json", code, nvram, [], both)
    data = json.loads(qcow2.read_text())
    data["mapping"]["executable"]["format"] = "qcow2"
    qcow2.write_text(json.dumps(data))
    (found / "15-broken.json").write_text("{not json")
    descriptor(found, "20-good.json", code, nvram, [], both)
    plan = plan_firmware("uefi", descriptor_dirs=(found,))
    assert plan is not None and plan.source == str(found / "20-good.json")


def test_without_descriptors_debian_paths_are_used(
    tmp_path: Path, ovmf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(firmware, "_OVMF_DIR", ovmf)
    monkeypatch.setattr(
        firmware,
        "_DEBIAN_FILES",
        {"uefi": ("CODE.fd", "VARS.fd"), "uefi-secure": ("CODE.secboot.fd", "VARS.ms.fd")},
    )
    plan = plan_firmware("uefi-secure", descriptor_dirs=(tmp_path / "none",))
    assert plan is not None
    assert (plan.code, plan.vars_template) == (ovmf / "CODE.secboot.fd", ovmf / "VARS.ms.fd")
    assert plan.secure and plan.requires_smm


def test_missing_ovmf_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(firmware, "_OVMF_DIR", tmp_path / "OVMF")
    with pytest.raises(HypervisorError, match="'ovmf'"):
        plan_firmware("uefi", descriptor_dirs=(tmp_path,))


def test_this_hosts_ovmf_if_installed() -> None:
    """On Debian bookworm with the ovmf package: the descriptors it ships are found."""
    # make setup installs Debian's ovmf package.
    assert Path("/usr/share/qemu/firmware/60-edk2-x86_64.json").is_file()
    uefi, secure = plan_firmware("uefi"), plan_firmware("uefi-secure")
    assert uefi is not None and secure is not None
    assert uefi.code.name == "OVMF_CODE_4M.fd" and uefi.vars_template.name == "OVMF_VARS_4M.fd"
    assert secure.vars_template.name == "OVMF_VARS_4M.ms.fd" and secure.requires_smm
    assert secure.code.resolve().name == "OVMF_CODE_4M.secboot.fd"


# --- the task's variable store ---------------------------------------------------------------


def test_prepare_vars_copies_privately_and_leaves_the_template(tmp_path: Path, ovmf: Path) -> None:
    template = ovmf / "VARS.fd"
    os.chmod(template, 0o444)
    before = template.read_bytes()
    plan = FirmwarePlan("uefi", ovmf / "CODE.fd", template, False, False, "test")
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    copy = prepare_vars(plan, task_dir)
    assert copy == task_dir / firmware.VARS_FILE
    assert copy.read_bytes() == before
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert template.read_bytes() == before and stat.S_IMODE(template.stat().st_mode) == 0o444
    assert [p.name for p in task_dir.iterdir()] == [firmware.VARS_FILE]  # no temporary left


def test_prepare_vars_keeps_the_guests_nvram_but_replaces_a_wrong_size(
    tmp_path: Path, ovmf: Path
) -> None:
    plan = FirmwarePlan("uefi", ovmf / "CODE.fd", ovmf / "VARS.fd", False, False, "test")
    copy = prepare_vars(plan, tmp_path)
    written_by_guest = b"G" * copy.stat().st_size
    copy.write_bytes(written_by_guest)
    assert prepare_vars(plan, tmp_path).read_bytes() == written_by_guest
    copy.write_bytes(b"half")
    assert prepare_vars(plan, tmp_path).read_bytes() == plan.vars_template.read_bytes()


def test_prepare_vars_failure_is_a_hypervisor_error(tmp_path: Path, ovmf: Path) -> None:
    plan = FirmwarePlan("uefi", ovmf / "CODE.fd", ovmf / "VARS.fd", False, False, "test")
    with pytest.raises(HypervisorError, match="variable store"):
        prepare_vars(plan, tmp_path / "no-such-dir")

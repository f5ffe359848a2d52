"""Accelerator choice, probe plumbing, KVM UAPI constants and QEMU binary discovery.

Nothing here touches /dev/kvm; the real probe is exercised in tests/integration/test_kvm_probe.py.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError, VMRequestError
from nomad_vm.vm import kvm_probe
from nomad_vm.vm.accel import (
    AcceleratorChoice,
    KvmStatus,
    choose_accelerator,
    parse_probe_output,
    run_probe_process,
)
from nomad_vm.vm.qemu.binary import (
    clear_version_cache,
    find_qemu,
    find_qemu_img,
    parse_qemu_version,
    qemu_version,
)

USABLE = KvmStatus(True, "real-mode test code ended with KVM_EXIT_HLT (5)")
BROKEN = KvmStatus(
    False,
    "KVM_RUN of real-mode test code ended with KVM_EXIT_INTERNAL_ERROR (17) "
    "instead of KVM_EXIT_HLT",
)


# --- choose_accelerator ---


def test_auto_picks_kvm_when_usable() -> None:
    choice = choose_accelerator("auto", USABLE)
    assert choice.name == "kvm"
    assert USABLE.reason in choice.reason


def test_auto_falls_back_to_tcg_and_says_why() -> None:
    choice = choose_accelerator("auto", BROKEN)
    assert choice == AcceleratorChoice(
        "tcg", f"KVM not usable: {BROKEN.reason}; using TCG (software emulation)"
    )


def test_explicit_kvm_when_usable() -> None:
    assert choose_accelerator("kvm", USABLE).name == "kvm"


def test_explicit_kvm_when_unusable_is_an_error_naming_the_setting() -> None:
    with pytest.raises(VMRequestError) as caught:
        choose_accelerator("kvm", BROKEN)
    assert caught.value.option == "accelerator"
    assert BROKEN.reason in caught.value.reason
    assert '"auto"' in caught.value.reason and '"tcg"' in caught.value.reason


@pytest.mark.parametrize("kvm", [USABLE, BROKEN])
def test_explicit_tcg_ignores_kvm(kvm: KvmStatus) -> None:
    assert choose_accelerator("tcg", kvm).name == "tcg"


@pytest.mark.parametrize("setting", ["", "KVM", "hvf", "kvm:tcg"])
def test_unknown_setting_names_field_and_allowed_values(setting: str) -> None:
    with pytest.raises(VMRequestError) as caught:
        choose_accelerator(setting, USABLE)
    assert caught.value.option == "accelerator"
    for allowed in ('"auto"', '"kvm"', '"tcg"'):
        assert allowed in caught.value.reason


def test_choices_are_frozen() -> None:
    choice = choose_accelerator("tcg", USABLE)
    with pytest.raises(AttributeError):
        choice.name = "kvm"  # type: ignore[misc]


# --- probe output handling (the child process is untrusted input) ---


def test_parse_probe_output_accepts_one_json_line() -> None:
    status = parse_probe_output(0, '{"usable": false, "reason": "/dev/kvm does not exist"}\n', "")
    assert status == KvmStatus(False, "/dev/kvm does not exist")


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "expected_in_reason"),
    [
        (1, "", "Traceback: ImportError: no module nomad_vm", "ImportError"),
        (0, "not json\n", "", "not json"),
        (0, '{"usable": "yes", "reason": "x"}\n', "", "no valid result"),
        (0, '{"usable": true, "reason": ""}\n', "", "no valid result"),
        (0, "", "", "no output"),
    ],
)
def test_parse_probe_output_never_trusts_garbage(
    returncode: int, stdout: str, stderr: str, expected_in_reason: str
) -> None:
    status = parse_probe_output(returncode, stdout, stderr)
    assert status.usable is False
    assert expected_in_reason in status.reason


def test_run_probe_process_kills_a_hung_child() -> None:
    status = run_probe_process([sys.executable, "-c", "import time; time.sleep(30)"], 0.3)
    assert status.usable is False
    assert "did not finish within 0.3 s" in status.reason


def test_run_probe_process_reports_a_missing_interpreter(tmp_path: Path) -> None:
    status = run_probe_process([str(tmp_path / "no-python")], 5.0)
    assert status.usable is False
    assert "could not start the KVM probe" in status.reason


def test_probe_reports_a_missing_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "kvm")
    assert kvm_probe.probe(missing) == (False, f"{missing} does not exist")


# --- KVM UAPI: values from <linux/kvm.h> compiled with gcc on x86_64 ---


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_GET_API_VERSION", 0xAE00),
        ("KVM_CREATE_VM", 0xAE01),
        ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04),
        ("KVM_CREATE_VCPU", 0xAE41),
        ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
        ("KVM_SET_TSS_ADDR", 0xAE47),
        ("KVM_RUN", 0xAE80),
        ("KVM_GET_REGS", 0x8090AE81),
        ("KVM_SET_REGS", 0x4090AE82),
        ("KVM_GET_SREGS", 0x8138AE83),
        ("KVM_SET_SREGS", 0x4138AE84),
    ],
)
def test_ioctl_numbers_match_the_uapi_header(name: str, value: int) -> None:
    assert getattr(kvm_probe, name) == value


def test_struct_layouts_match_the_uapi_header() -> None:
    assert ctypes.sizeof(kvm_probe.KvmRegs) == 144
    assert kvm_probe.KvmRegs.rip.offset == 128
    assert ctypes.sizeof(kvm_probe.KvmSegment) == 24
    assert ctypes.sizeof(kvm_probe.KvmSregs) == 312
    assert ctypes.sizeof(kvm_probe.KvmUserspaceMemoryRegion) == 32
    assert kvm_probe.KvmRunPrefix.exit_reason.offset == 8
    assert kvm_probe.KvmRunPrefix.u.offset == 32


def test_describe_exit_names_internal_error_and_suberror() -> None:
    run = kvm_probe.KvmRunPrefix()
    run.exit_reason = kvm_probe.KVM_EXIT_INTERNAL_ERROR
    run.u.internal.suberror = 1
    assert kvm_probe.describe_exit(run) == (
        "KVM_EXIT_INTERNAL_ERROR (17), suberror 1 (KVM_INTERNAL_ERROR_EMULATION)"
    )


# --- QEMU version parsing ---


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n", "7.2.19"),
        (
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
            "7.2.22",
        ),
        ("QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1.4)\n", "8.2.2"),
        ("QEMU emulator version 6.2.0 (qemu-kvm-6.2.0-11.el9_0.3)\n", "6.2.0"),
        ("QEMU emulator version 9.0.50 (v9.0.0-1388-g80e8f06021-dirty)\n", "9.0.50"),
        ("QEMU emulator version 10.0\n", "10.0"),
        ("qemu-img version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n", "7.2.19"),
    ],
)
def test_parse_qemu_version(text: str, version: str) -> None:
    assert parse_qemu_version(text) == version


@pytest.mark.parametrize("text", ["", "usage: qemu-system-x86_64 [options]\n", "QEMU 7\n"])
def test_parse_qemu_version_without_a_version(text: str) -> None:
    assert parse_qemu_version(text) is None


# --- finding binaries ---


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_find_qemu_missing_from_path_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HypervisorError) as caught:
        find_qemu(None)
    message = str(caught.value)
    assert "qemu-system-x86_64 not found on PATH" in message
    assert "qemu-system-x86" in message and "qemu_binary" in message


def test_find_qemu_img_missing_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HypervisorError, match="qemu-img not found on PATH; install"):
        find_qemu_img()


def test_find_qemu_configured_path_missing(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match=r"qemu_binary .* does not exist"):
        find_qemu(str(tmp_path / "qemu"))


def test_find_qemu_configured_file_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "qemu"
    plain.write_text("")
    plain.chmod(0o644)
    # Even root may execute a file only when some x bit is set.
    assert not os.access(plain, os.X_OK)
    with pytest.raises(HypervisorError, match="is not executable"):
        find_qemu(str(plain))


def test_find_qemu_configured_directory(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="is not a regular file"):
        find_qemu(str(tmp_path))


def test_find_and_version_of_a_temp_executable(tmp_path: Path) -> None:
    fake = _script(tmp_path / "qemu-fake", 'echo "QEMU emulator version 7.2.19 (Debian 1:7.2)"')
    assert find_qemu(str(fake)) == fake
    clear_version_cache()
    assert qemu_version(fake) == "7.2.19"


def test_configured_name_is_looked_up_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script(tmp_path / "my-qemu", "true")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_qemu("my-qemu") == tmp_path / "my-qemu"
    # An unset optional HCL string arrives as "": it means the default name.
    with pytest.raises(HypervisorError, match=r"^qemu-system-x86_64 not found on PATH"):
        find_qemu("")
    with pytest.raises(HypervisorError, match="qemu_binary 'other' not found on PATH"):
        find_qemu("other")


def test_version_is_cached_until_the_binary_changes(tmp_path: Path) -> None:
    fake = _script(tmp_path / "qemu", 'echo "QEMU emulator version 7.2.19"')
    clear_version_cache()
    assert qemu_version(fake) == "7.2.19"
    mtime_ns = fake.stat().st_mtime_ns
    _script(fake, 'echo "QEMU emulator version 8.0.0"')
    os.utime(fake, ns=(mtime_ns, mtime_ns))
    assert qemu_version(fake) == "7.2.19"  # same path and mtime: not asked again
    os.utime(fake, ns=(mtime_ns + 1_000_000_000, mtime_ns + 1_000_000_000))
    assert qemu_version(fake) == "8.0.0"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('echo "boom" >&2; exit 3', "exited with status 3: boom"),
        ('echo "usage: qemu"', "printed no version number"),
    ],
)
def test_version_failures_become_hypervisor_errors(tmp_path: Path, body: str, match: str) -> None:
    fake = _script(tmp_path / "qemu", body)
    clear_version_cache()
    with pytest.raises(HypervisorError, match=match):
        qemu_version(fake)


def test_version_of_a_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot stat"):
        qemu_version(tmp_path / "gone")


def test_version_of_a_file_that_cannot_be_run(tmp_path: Path) -> None:
    broken = tmp_path / "qemu"
    broken.write_bytes(b"\x7fELF not really")
    broken.chmod(0o755)
    clear_version_cache()
    with pytest.raises(HypervisorError, match="cannot run"):
        qemu_version(broken)

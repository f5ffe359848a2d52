"""Real boots of the tiny guest under each firmware and machine type (bare QEMU, TCG).

The QEMU command lines come from our own nomad_vm.vm.machine / nomad_vm.vm.firmware, so these
tests check that what validate_machine accepts really boots, and that QMP system_powerdown
(the ACPI power button) stops the guest in each combination.

Secure Boot is proven with keys made here at run time (nothing is committed): a fresh key is
enrolled as PK, KEK and db into a copy of OVMF's empty variable store, the tiny guest's kernel is
signed with it, and then

* the signed kernel boots with Secure Boot on (the kernel reports it, and loads our db
  certificate from the firmware), both as ``-kernel`` and from a disk, and
* from a disk, the firmware refuses ("Access Denied") the same kernel unsigned, and signed by
  Debian (a key not in our db): enforcement is real.

Debian 12's OVMF does *not* enforce it for ``-kernel``: when verification fails it falls back to
its legacy Linux loader, which checks nothing (see nomad_vm/vm/firmware.py). That is why the
refusal is shown with the disk boot path, where the firmware's own image verification applies.

Needs: Debian ovmf, sbsigntool (sbsign, sbattach), openssl; the PyPI package virt-firmware.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from nomad_vm.guests.tiny import TinyGuest, tiny_cmdline
from nomad_vm.storage.held import FileHolder, open_own
from nomad_vm.vm.firmware import FirmwarePlan, plan_firmware, prepare_vars
from nomad_vm.vm.machine import MachineConfig, machine_argv, validate_machine
from nomad_vm.vm.qemu.files_argv import FdSets, firmware_argv
from tests.console import QemuConsole as Console
from tests.console import run_qemu

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
MARK = "nomad-vm tiny guest:"
READY = "firmware-test: ready"
# Everything but the machine and firmware (those come from machine_argv). 256 MiB: OVMF plus
# Debian's kernel; -no-reboot so that a guest poweroff or panic ends QEMU.
# fmt: off
COMMON_ARGS = (
    "-nodefaults", "-no-user-config", "-accel", "tcg", "-m", "256M",
    "-display", "none", "-vga", "none", "-serial", "stdio", "-no-reboot",
)
# fmt: on
# What the guest prints about its firmware, then it waits for the power button.
PROBE = (
    "if [ -d /sys/firmware/efi ]; then echo firmware-test: UEFI; else echo firmware-test: BIOS; "
    "fi; dmesg | grep -e 'secureboot:' -e 'Loaded X.509 cert'; "
    f"echo {READY}; sleep 600"
)
SECURE_BOOT_ON = "secureboot: Secure boot enabled"
TEST_CERT_CN = "nomad-vm test Secure Boot key"
BOOT_TIMEOUT = 180.0

# Seconds from QEMU start to the tiny guest's "booted" line, printed at the end of the module.
BOOT_TIMES: dict[str, float] = {}


def qemu(
    argv: list[str], pass_fds: tuple[int, ...] = ()
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], Console]]:
    return run_qemu([QEMU, *COMMON_ARGS, *argv], pass_fds)


def platform_argv(
    cfg: MachineConfig, plan: FirmwarePlan | None, vars_path: Path | None, files: FileHolder
) -> tuple[list[str], tuple[int, ...]]:
    """The machine and its flash images as the driver gives them to QEMU (descriptors), and
    the descriptors QEMU must inherit."""
    argv = machine_argv(cfg, plan)
    if plan is None or vars_path is None:
        return argv, ()
    code = open_own(plan.code, files, writable=False, follow_symlinks=True)
    variables = open_own(vars_path, files, writable=True)
    return [*argv, *firmware_argv(FdSets(), plan, code, variables)], files.fds


async def system_powerdown(socket: Path) -> None:
    client = QMPClient("firmware-test")
    await client.connect(str(socket))
    await client.execute("system_powerdown")
    # QEMU may exit before the goodbye completes; that is the point.
    with contextlib.suppress(Exception):
        await client.disconnect()


def power_button_stops(process: subprocess.Popen[bytes], console: Console, qmp: Path) -> float:
    """Press the ACPI power button; seconds until QEMU exited (fails if it did not in 20 s)."""
    pressed = time.monotonic()
    asyncio.run(system_powerdown(qmp))
    try:
        code = process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"guest still running 20 s after system_powerdown:\n{console.text()}")
    assert code == 0, console.text()
    assert f"{MARK} power button pressed" in console.text()
    return time.monotonic() - pressed


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vmlinuz_of(guest: TinyGuest) -> Path:
    if not guest.vmlinuz.is_file():
        pytest.fail(f"{guest.vmlinuz} is missing: the cached tiny guest predates vmlinuz")
    return guest.vmlinuz


@pytest.fixture(scope="module", autouse=True)
def report_boot_times() -> Iterator[None]:
    yield
    print("\nseconds from QEMU start to the tiny guest's 'booted' line (TCG):")
    for name, seconds in BOOT_TIMES.items():
        print(f"  {name:<34} {seconds:6.2f}")


# --- bios and uefi -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("firmware", "machine"),
    [("bios", "pc"), ("bios", "q35"), ("bios", "microvm"), ("uefi", "pc"), ("uefi", "q35")],
)
def test_boot_and_acpi_power_button(
    tiny_guest: TinyGuest, short_tmp: Path, firmware: str, machine: str
) -> None:
    cfg = validate_machine("x86_64", machine, firmware, has_kernel=True, has_disk=False)
    plan = plan_firmware(firmware)
    vars_path = None if plan is None else prepare_vars(plan, short_tmp)
    template_before = None if plan is None else sha256(plan.vars_template)
    # OVMF starts only EFI binaries: the bzImage with its EFI stub, not the PVH vmlinux.
    kernel = tiny_guest.vmlinux if plan is None else vmlinuz_of(tiny_guest)
    base = tiny_guest.cmdline
    if machine == "microvm":
        # microvm has no PIT speaker port, HPET or ACPI PM timer: under TCG (no kvmclock) the
        # kernel cannot calibrate the TSC and hangs at boot unless told its frequency.
        base += " tsc_early_khz=2000000"
    qmp = short_tmp / "qmp.sock"
    files = FileHolder()
    platform, fds = platform_argv(cfg, plan, vars_path, files)
    argv = [*platform, "-qmp", f"unix:{qmp},server=on,wait=off"]
    argv += ["-kernel", str(kernel), "-initrd", str(tiny_guest.initramfs)]
    argv += ["-append", tiny_cmdline(base, PROBE)]
    with files, qemu(argv, fds) as (process, console):
        booted = console.wait_for(f"{MARK} booted")
        console.wait_for(READY)
        stopped = power_button_stops(process, console, qmp)
        output = console.text()
    BOOT_TIMES[f"{firmware} on {machine}"] = booted
    print(f"\n{firmware}/{machine}: booted {booted:.2f} s, power button stop {stopped:.2f} s")
    expected = "UEFI" if plan is not None else "BIOS"
    assert f"firmware-test: {expected}" in output, output
    assert SECURE_BOOT_ON not in output
    if plan is not None:
        assert sha256(plan.vars_template) == template_before, "the VARS template was written"


# --- uefi-secure ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SigningKeys:
    key: Path
    cert: Path
    owner: str  # the GUID the signature list entries carry
    signed: Path  # the tiny guest's kernel, signed with our key only
    unsigned: Path  # the same kernel with its signature table removed
    debian: Path  # the kernel as Debian ships it (signed by Debian, not in our db)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv[0]} failed: {done.stdout}{done.stderr}"


def _need_tools() -> None:
    missing = [tool for tool in ("openssl", "sbsign", "sbattach") if shutil.which(tool) is None]
    if importlib.util.find_spec("virt.firmware") is None:
        missing.append("virt-firmware (PyPI, a dev dependency)")
    if missing:
        pytest.fail(
            "Secure Boot tests need: " + ", ".join(missing) + " (Debian: openssl, sbsigntool)"
        )


@pytest.fixture(scope="module")
def signing_keys(tiny_guest: TinyGuest, tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    """A throw-away Secure Boot key and the tiny guest's kernel signed with it."""
    _need_tools()
    work = tmp_path_factory.mktemp("secure-boot")
    key, cert = work / "test.key", work / "test.crt"
    # fmt: off
    _run([
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1",
        "-subj", f"/CN={TEST_CERT_CN}", "-keyout", str(key), "-out", str(cert),
    ])
    # fmt: on
    debian = vmlinuz_of(tiny_guest)
    unsigned, signed = work / "vmlinuz.unsigned", work / "vmlinuz.signed"
    shutil.copyfile(debian, unsigned)
    _run(["sbattach", "--remove", str(unsigned)])
    _run(["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(signed), str(unsigned)])
    return SigningKeys(key, cert, str(uuid.uuid4()), signed, unsigned, debian)


def secure_plan_with(keys: SigningKeys, dest: Path, boot_entry: str | None = None) -> FirmwarePlan:
    """The uefi-secure plan, but with a VARS template holding only our key (PK, KEK, db),
    Secure Boot enabled, and optionally a boot entry (``\\file options``) for disk boots."""
    secure, empty = plan_firmware("uefi-secure"), plan_firmware("uefi")
    assert secure is not None and empty is not None
    assert secure.requires_smm, "uefi-secure must be OVMF's SMM build"
    owner, cert = keys.owner, str(keys.cert)
    argv = [sys.executable, "-m", "virt.firmware.vars", "-i", str(empty.vars_template)]
    argv += ["-o", str(dest), "--set-pk", owner, cert, "--add-kek", owner, cert]
    argv += ["--add-db", owner, cert, "--secure-boot"]
    if boot_entry is not None:
        argv += ["--append-boot-filepath", boot_entry]
    _run(argv)
    return dataclasses.replace(secure, vars_template=dest)


def test_secure_boot_with_signed_kernel(
    tiny_guest: TinyGuest, signing_keys: SigningKeys, short_tmp: Path
) -> None:
    cfg = validate_machine("x86_64", "q35", "uefi-secure", has_kernel=True, has_disk=False)
    plan = secure_plan_with(signing_keys, short_tmp / "template.fd")
    template_before = sha256(plan.vars_template)
    task_dir = short_tmp / "task"
    task_dir.mkdir()
    vars_path = prepare_vars(plan, task_dir)
    qmp = short_tmp / "qmp.sock"
    files = FileHolder()
    platform, fds = platform_argv(cfg, plan, vars_path, files)
    argv = [*platform, "-qmp", f"unix:{qmp},server=on,wait=off"]
    argv += ["-kernel", str(signing_keys.signed), "-initrd", str(tiny_guest.initramfs)]
    argv += ["-append", tiny_cmdline(tiny_guest.cmdline, PROBE)]
    with files, qemu(argv, fds) as (process, console):
        booted = console.wait_for(f"{MARK} booted")
        console.wait_for(READY)
        stopped = power_button_stops(process, console, qmp)
        output = console.text()
    BOOT_TIMES["uefi-secure on q35 (-kernel)"] = booted
    print(f"\nuefi-secure/q35: booted {booted:.2f} s, power button stop {stopped:.2f} s")
    assert "firmware-test: UEFI" in output
    assert SECURE_BOOT_ON in output, output
    # The kernel read db from the firmware: our certificate is the one in force.
    assert f"Loaded X.509 cert '{TEST_CERT_CN}" in output, output
    assert sha256(plan.vars_template) == template_before, "the VARS template was written"
    assert vars_path.parent == task_dir and vars_path.is_file()


@pytest.mark.parametrize("image", ["signed", "unsigned", "debian"])
def test_secure_boot_enforced_for_disk_boot(
    tiny_guest: TinyGuest, signing_keys: SigningKeys, short_tmp: Path, image: str
) -> None:
    """The firmware itself verifies what it loads from a disk: only our signature passes."""
    kernel = {"signed": signing_keys.signed, "unsigned": signing_keys.unsigned}.get(
        image, signing_keys.debian
    )
    # An EFI system partition for QEMU's virtual FAT drive: the kernel as an EFI application,
    # started by a boot entry whose options are the kernel command line (the EFI stub loads
    # the initramfs named by initrd= from the same partition).
    esp = short_tmp / "esp"
    esp.mkdir()
    shutil.copyfile(kernel, esp / "linux.efi")
    shutil.copyfile(tiny_guest.initramfs, esp / "initrd.img")
    options = tiny_cmdline(f"{tiny_guest.cmdline} initrd=\\initrd.img", PROBE)
    plan = secure_plan_with(signing_keys, short_tmp / "template.fd", f"\\linux.efi {options}")
    cfg = validate_machine("x86_64", "q35", "uefi-secure", has_kernel=False, has_disk=True)
    vars_path = prepare_vars(plan, short_tmp)
    disk = f"if=virtio,format=raw,readonly=on,file=fat:{esp}"
    files = FileHolder()
    platform, fds = platform_argv(cfg, plan, vars_path, files)
    with files, qemu([*platform, "-drive", disk], fds) as (_, console):
        if image == "signed":
            booted = console.wait_for(f"{MARK} booted")
            console.wait_for(READY)
            BOOT_TIMES["uefi-secure on q35 (from disk)"] = booted
            assert SECURE_BOOT_ON in console.text(), console.text()
            return
        console.wait_for("No bootable option or device was found")
        output = console.text()
    assert 'failed to load Boot0000 "file linux.efi"' in output, output
    assert "Access Denied" in output
    assert f"{MARK} booted" not in output

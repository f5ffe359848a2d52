"""The pieces of the Windows switch on the tiny guest through the real plugin (real QEMU under
TCG, real swtpm): the TPM's swtpm (as vm_user, recorded, handed its socket, its state kept in
the task dir, gone with the VM), the Hyper-V note under TCG, the RTC in local time, and the ACPI
power button pressed again until a guest that ignores the first press powers off.

The tiny guest has no TPM driver: it reads the ACPI TPM2 table QEMU builds for the device; the
guest's use of the TPM is tested with the Debian guest (tests/integration/test_windows_debian.py).
"""

from __future__ import annotations

import re
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import psutil
import pytest

from nomad_vm.driver.journal import TaskJournal
from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.hyperv import RECOMMENDED
from tests.conftest import processes_under, vm_processes_under, wait_until
from tests.integration.pluginkit import DRIVER, drv, tiny_task
from tests.integration.test_fd_hygiene import open_files
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait
from tests.tpm_replay import sha1_replay

RUNNING = b"nomad-vm tiny guest: running"
# Far from UTC (+13:45 in December), so a clock in local time cannot pass for UTC.
HOST_TZ = "Pacific/Chatham"
VM_USER = "nomad-vm"

PCR = "/sys/class/tpm/tpm0/pcr-{}/10"
# Prints the RTC as the guest's kernel reads it and whether the firmware's ACPI tables describe
# a TPM 2.0 (QEMU adds a TPM2 table for its tpm-crb); then uses the TPM as the guest's kernel
# drives it (tpm_crb is built into Debian's kernel): PCR 10 read (TPM2_PCR_Read, sysfs),
# extended by IMA when a program never run before is run (the policy written here measures
# every program run from now on), read again, and IMA's measurement list printed for the
# replay. Then it waits for the stop.
SHOW = (
    'echo "rtc=$(cat /sys/class/rtc/rtc0/date)T$(cat /sys/class/rtc/rtc0/time)"; '
    "[ -e /sys/firmware/acpi/tables/TPM2 ] && echo tpm2-table=yes || echo tpm2-table=no; "
    "mount -t securityfs none /sys/kernel/security; "
    'echo "tpm=$(cat /sys/class/tpm/tpm0/tpm_version_major) '
    '$(basename $(readlink /sys/class/tpm/tpm0/device/driver)) $(ls /dev/tpmrm0)"; '
    f'echo "before=$(cat {PCR.format("sha1")}) $(cat {PCR.format("sha256")})"; '
    "echo 'measure func=BPRM_CHECK' > /sys/kernel/security/ima/policy; "
    "printf '#!/bin/sh\\necho probe-ran\\n' > /tmp/probe; chmod +x /tmp/probe; /tmp/probe; "
    f'echo "after=$(cat {PCR.format("sha1")}) $(cat {PCR.format("sha256")})"; '
    "echo ima-log; cat /sys/kernel/security/ima/ascii_runtime_measurements; echo ima-end; "
    "echo shown; while :; do sleep 1; done"
)


@pytest.fixture
def plugin_in_tz(short_tmp: Path):  # type: ignore[no-untyped-def]
    """The plugin (and so QEMU, which inherits its environment) in a time zone far from UTC."""
    proc = PluginProcess([str(DRIVER)], env={"TZ": HOST_TZ})
    proc.start(short_tmp / "plugin.stderr")
    yield proc
    proc.kill()


def swtpm_processes(root: Path) -> list[psutil.Process]:
    return processes_under(root, "swtpm")


def test_tpm_hyperv_and_localtime_rtc(
    plugin_in_tz: PluginProcess, short_tmp: Path, tiny_guest
) -> None:  # type: ignore[no-untyped-def]
    plugin = plugin_in_tz
    stream, events = collect_events(plugin)
    # vmlinuz: an ELF vmlinux boots through QEMU's PVH entry, where a TPM breaks the guest's
    # ACPI tables (refused: test_a_pvh_kernel_with_a_tpm_is_refused).
    options = {
        "os": {"machine": "q35"},
        "tpm": True,
        "hyperv": True,
        "rtc": "localtime",
        "kernel": str(tiny_guest.vmlinuz),
    }
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="win", run=SHOW, overrides=options
    ) as (cfg, fifo, alloc):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        state = alloc / "tiny" / "nomad-vm-tpm"
        (runtime,) = set((alloc / "tiny").glob("nomad-vm-*")) - {state}
        (swtpm,) = swtpm_processes(short_tmp)
        uids, user, argv = swtpm.uids(), swtpm.username(), " ".join(swtpm.cmdline())
        (qemu,) = processes_under(short_tmp, "qemu-system")
        qemu_argv = qemu.cmdline()
        assert plugin.process is not None
        # The plugin keeps no descriptor of anything in the allocation (the TPM's state dir,
        # swtpm's log, the disk ...; a socket shows no path, so it is not seen here).
        held = open_files(plugin.process.pid)
        journal = next((short_tmp / "data" / "journal").glob("*.msgpack"))
        recorded = TaskJournal.decode(journal.read_bytes())
        assert fifo.wait_for(b"shown", 120), bytes(fifo.data[-2000:])
        console = bytes(fifo.data).decode(errors="replace")
        host_now = datetime.now(ZoneInfo(HOST_TZ)).replace(tzinfo=None)
        elapsed = stop(plugin, cfg.id, 20)
        result = wait(plugin, cfg.id)
        swtpm_gone = wait_until(lambda: not swtpm_processes(short_tmp), 10)
        destroy(plugin, cfg.id)
        kept = sorted(p.name for p in state.iterdir())
        state_mode = state.stat()
    stream.cancel()
    # swtpm: one, as vm_user, journalled as the VM's helper, ended with the VM.
    assert uids.real == uids.effective != 0
    assert user == VM_USER
    assert [p.ident.pid for p in recorded.processes if p.role == "swtpm"] == [swtpm.pid]
    assert str(state) in recorded.volumes  # kept: the replay leaves it
    assert not [name for name in held if str(alloc) in name], held
    assert swtpm_gone and not vm_processes_under(short_tmp)
    assert not runtime.exists()  # the control socket went with the runtime dir
    # It got its control socket and state directory as descriptors, named by no path.
    assert "--tpmstate dir=/proc/self/fd/" in argv and "type=unixio,fd=" in argv, argv
    assert "emulator,id=tpm0,chardev=tpmchr" in qemu_argv and "tpm-crb,tpmdev=tpm0" in qemu_argv
    assert "base=localtime" in qemu_argv
    # The TPM's state stays in the task dir (0700, vm_user's), for the next start in the alloc.
    assert "tpm2-00.permall" in kept, kept
    assert stat.S_IMODE(state_mode.st_mode) == 0o700
    assert state_mode.st_uid == uids.real
    # The guest: a TPM 2.0 its firmware describes and its kernel drives, whose PCR 10 it
    # extends (both banks change) and reads back, equal to the replay of IMA's list.
    assert "tpm2-table=yes" in console, console[-2000:]
    assert "tpm=2 tpm_crb /dev/tpmrm0" in console, console[-2000:]
    before = re.search(r"before=(\w+) (\w+)", console)
    after = re.search(r"after=(\w+) (\w+)", console)
    assert before and after and "probe-ran" in console, console[-3000:]
    assert before.group(1) != after.group(1) and before.group(2) != after.group(2)
    ima = console.split("ima-log", 1)[1].split("ima-end", 1)[0].replace("\r", "")
    assert " /tmp/probe" in ima, ima
    assert sha1_replay(ima) == after.group(1).lower(), ima
    match = re.search(r"rtc=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", console)
    assert match, console[-2000:]
    rtc = datetime.fromisoformat(match.group(1))
    assert abs(rtc - host_now) < timedelta(minutes=3), (rtc, host_now)
    utc_now = datetime.now(UTC).replace(tzinfo=None)
    assert abs(rtc - utc_now) > timedelta(hours=12), (rtc, utc_now)
    # Hyper-V: every enlightenment dropped under TCG, and the task told which.
    dropped = [m for m in events if m.startswith("Hyper-V enlightenments dropped")]
    assert dropped and all(flag in dropped[0] for flag in RECOMMENDED), events
    assert not any(arg.startswith("hv-") or ",hv-" in arg for arg in qemu_argv), qemu_argv
    assert (result.result.exit_code, result.err) == (0, ""), result
    assert elapsed < 15


# Plays a guest that ignores the first press of the power button (as Windows does while
# nobody is logged in): reads the button's input events itself, one 24-byte input_event per
# read (a press is key down, sync, key up, sync), and powers off at the second press.
IGNORE_FIRST_PRESS = (
    "for dev in /sys/class/input/event*; do "
    '[ "$(cat $dev/device/name)" = "Power Button" ] && node=/dev/input/${dev##*/}; done; '
    "exec 3<$node; echo listening; "
    "dd bs=24 count=4 <&3 >/dev/null 2>&1; echo first-press-ignored; "
    "dd bs=24 count=1 <&3 >/dev/null 2>&1; echo second-press; poweroff -f"
)


def test_power_button_is_pressed_again_until_the_guest_stops(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    # Its init's own power-button watcher is off (ignore_acpi): the command does the listening.
    cmdline = tiny_cmdline(f"{tiny_guest.cmdline} nomadvm.ignore_acpi=1", IGNORE_FIRST_PRESS)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="press", overrides={"cmdline": cmdline}
    ) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(b"listening", 120), bytes(fifo.data[-2000:])
        started = time.monotonic()
        elapsed = stop(plugin, cfg.id, 40)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
        console = bytes(fifo.data)
    stream.cancel()
    assert b"first-press-ignored" in console and b"second-press" in console, console[-2000:]
    assert (result.result.exit_code, result.err) == (0, ""), result
    # The second press came one interval after the first, well before kill_timeout.
    assert 9 < elapsed < 25 and time.monotonic() - started < 30, elapsed
    assert any(m.startswith("ACPI shutdown requested") for m in events), events
    assert any("ACPI power button pressed again (press 2" in m for m in events), events
    assert not any("terminated" in m for m in events), events
    assert not vm_processes_under(short_tmp)


def test_a_pvh_kernel_with_a_tpm_is_refused(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """QEMU 7.2's PVH entry with a TPM device gives the guest corrupt ACPI tables (seen with
    the tiny guest's vmlinux: "ACPI: Interpreter disabled", no power button): refused before
    anything exists."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="pvh", overrides={"tpm": True}) as (
        cfg,
        _,
        alloc,
    ):
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert "config.tpm" in str(err.value.details()) and "PVH" in str(err.value.details())
        assert sorted(p.name for p in (alloc / "tiny").iterdir()) == []
        assert not list((short_tmp / "data" / "journal").glob("*"))
    assert not vm_processes_under(short_tmp)

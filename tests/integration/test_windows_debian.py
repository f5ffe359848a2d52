"""`os { variant = "win11" }` on the Debian test guest through the real plugin, under a node
whose default firmware is UEFI Secure Boot (seed 004), with real QEMU (TCG), OVMF and swtpm.

No Windows image exists here: the Linux guest stands in for every piece Windows would use. One
boot serves all checks (a Debian boot under TCG is minutes):

* UEFI with Secure Boot on, from the plugin's default_firmware (allow_task_firmware = false);
* a TPM 2.0 the guest's kernel drives (tpm_crb, /dev/tpmrm0): PCR 10 extended by the kernel's
  IMA when the guest runs a new program (the guest image has no tpm2-tools; IMA is in its
  kernel), read back through the kernel's TPM2_PCR_Read (sysfs), and equal to the replay of
  IMA's measurement list;
* the root file system on a SATA (AHCI) disk (the test's initrd adds the AHCI modules the
  shared image's initrd lacks: tests/sata_initrd.py);
* an e1000e NIC with its address from cloud-init, whose seed is a SATA CD-ROM that also
  carries a `seed_files` entry (an autounattend.xml);
* the RTC in the host's local time; the Hyper-V enlightenments dropped under TCG (task event),
  and the guest not told of any Hyper-V;
* the stop through the guest agent's guest-shutdown.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from nomad_vm.driver.network_plan import GROUP_BRIDGE
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import guest_cache, vm_processes_under, wait_until
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config
from tests.integration.test_debian_task import run
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait
from tests.integration.test_windows_pieces import HOST_TZ
from tests.netns import isolated_namespaces
from tests.sata_initrd import build_sata_initrd
from tests.tpm_replay import sha1_replay

GUEST_ADDRESS = "192.168.254.2"
READY = b"nomad-win-cmds-ran"
PROBE = f"""
import socket
try:
    socket.create_connection(("{GUEST_ADDRESS}", 22), timeout=20).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
"""
UNATTEND = b"<unattend xmlns='urn:schemas-microsoft-com:unattend'/>\n"


@pytest.fixture
def plugin_in_tz(short_tmp: Path) -> Iterator[PluginProcess]:
    proc = PluginProcess([str(DRIVER)], env={"TZ": HOST_TZ})
    proc.start(short_tmp / "plugin.stderr")
    yield proc
    proc.kill()


@pytest.fixture
def alloc_netns() -> Iterator[str]:
    with isolated_namespaces((GROUP_BRIDGE, "nvw")) as spaces:
        yield f"/run/netns/{spaces.new()}"


def pcr(plugin: PluginProcess, task_id: str, bank: str) -> str:
    out, code = run(plugin, task_id, f"cat /sys/class/tpm/tpm0/pcr-{bank}/10")
    assert code == 0, out
    return out.decode().strip().lower()


def check_tpm(plugin: PluginProcess, task_id: str) -> None:
    out, code = run(
        plugin,
        task_id,
        "cat /sys/class/tpm/tpm0/tpm_version_major; ls /dev/tpmrm0; "
        "cat /sys/class/tpm/tpm0/device/description 2>/dev/null; "
        "readlink /sys/class/tpm/tpm0/device/driver",
    )
    assert code == 0 and out.startswith(b"2\n/dev/tpmrm0\n") and b"tpm_crb" in out, out
    before = pcr(plugin, task_id, "sha1"), pcr(plugin, task_id, "sha256")
    # Measure every program run from now on (IMA's policy, written once), then run one that
    # never ran before: the kernel extends PCR 10 with its measurement.
    token = secrets.token_hex(8)
    script = (
        "echo 'measure func=BPRM_CHECK' > /sys/kernel/security/ima/policy && "
        f"printf '#!/bin/sh\\necho probe-{token}\\n' > /tmp/probe-{token} && "
        f"chmod +x /tmp/probe-{token} && /tmp/probe-{token}"
    )
    out, code = run(plugin, task_id, script)
    assert (code, out) == (0, f"probe-{token}\n".encode()), out
    after = pcr(plugin, task_id, "sha1"), pcr(plugin, task_id, "sha256")
    assert after[0] != before[0] and after[1] != before[1], (before, after)
    log, code = run(plugin, task_id, "cat /sys/kernel/security/ima/ascii_runtime_measurements")
    assert code == 0 and f"/tmp/probe-{token}".encode() in log, log[-2000:]
    assert sha1_replay(log.decode()) == pcr(plugin, task_id, "sha1")


def test_windows_variant_on_the_linux_guest_under_the_nodes_secure_boot(
    plugin_in_tz: PluginProcess,
    short_tmp: Path,
    alloc_netns: str,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    plugin = plugin_in_tz
    initrd = build_sata_initrd(debian_guest, guest_cache() / "debs", short_tmp / "initrd")
    configure(
        plugin,
        short_tmp / "data",
        [str(debian_guest.disk.parent), str(initrd.parent)],
        default_firmware="uefi-secure",
        allow_task_firmware=False,
    )
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "win" / "local").mkdir(parents=True)
    (alloc / "win" / "local" / "autounattend.xml").write_bytes(UNATTEND)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        "image": str(debian_guest.disk),
        # A bzImage: OVMF loads it (an ELF vmlinux would take QEMU's PVH entry).
        "kernel": str(debian_guest.vmlinuz),
        "initramfs": str(initrd),
        "cmdline": debian_guest.cmdline,
        "os": {"variant": "win11"},
        "network_interface": {"bridge": {}},
        "seed_files": ["local/autounattend.xml"],
        "cmds": [f"echo {READY.decode()} > /dev/ttyS0"],
        "share_task_dirs": False,
    }
    cfg = task_config(alloc, config, task_id="alloc/win/w11")
    cfg.name = "win"
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    cfg.network_isolation_spec.mode = driver_pb2.NetworkIsolationSpec.GROUP
    cfg.network_isolation_spec.path = alloc_netns
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 600), events
        # cloud-init read its seed from the SATA CD-ROM and ran the task's cmds.
        if not fifo.wait_for(READY, 600):
            why, _ = run(plugin, cfg.id, "cloud-init status --long; ls -l /dev/sr0; blkid")
            raise AssertionError(why + bytes(fifo.data[-3000:]))
        host_now = datetime.now(ZoneInfo(HOST_TZ)).replace(tzinfo=None)
        rtc, _ = run(
            plugin, cfg.id, "echo $(cat /sys/class/rtc/rtc0/date)T$(cat /sys/class/rtc/rtc0/time)"
        )
        secure, _ = run(plugin, cfg.id, "od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-*")
        root, _ = run(
            plugin,
            cfg.id,
            "findmnt -n -o SOURCE /; cat /sys/block/sda/device/vendor; readlink -f /sys/block/sda",
        )
        nic, _ = run(
            plugin,
            cfg.id,
            "for n in /sys/class/net/*/device; do i=${n%/device}; i=${i##*/}; "
            'echo "$i $(basename $(readlink $n/driver))"; ip -4 -o addr show dev $i; done',
        )
        seed, _ = run(
            plugin,
            cfg.id,
            "mkdir -p /mnt/seed && mount -o ro /dev/sr0 /mnt/seed && "
            "cat /mnt/seed/autounattend.xml; "
            "blkid -o value -s LABEL /dev/sr0; readlink -f /sys/block/sr0",
        )
        hyperv, _ = run(plugin, cfg.id, "dmesg | grep -i 'hypervisor detected' || echo none")
        # From the allocation's namespace to the guest's address: an answer (sshd's banner,
        # or the guest kernel's refusal) can only come through its e1000e NIC.
        reach = subprocess.run(
            ["ip", "netns", "exec", alloc_netns.rsplit("/", 1)[1], sys.executable, "-c", PROBE],
            capture_output=True,
            timeout=60,
        )
        check_tpm(plugin, cfg.id)
        elapsed = stop(plugin, cfg.id, 120)
        result = wait(plugin, cfg.id, timeout=60)
    finally:
        # DestroyTask (the driver's own clean-up) also after a failed check, so that the
        # namespace and the process checks below and in the fixtures see what it leaves.
        destroy(plugin, cfg.id)
        stream.cancel()
        fifo.close()
    # Secure Boot is on: the node's default firmware, which the task could not change.
    assert secure.split()[-1:] == [b"1"], secure
    # The root file system is on the SATA disk, behind the AHCI controller.
    lines = root.decode().split("\n")
    assert lines[0] == "/dev/sda" and lines[1].strip() == "ATA" and "/ata" in lines[2], root
    # An e1000e NIC, its address from cloud-init's network-config, reachable from the netns.
    assert b" e1000e" in nic and GUEST_ADDRESS.encode() in nic, nic
    assert reach.returncode == 0 and reach.stdout in (b"open\n", b"refused\n"), reach
    # The seed is a CD-ROM on AHCI carrying the task's seed_files next to cloud-init's files.
    assert seed.startswith(UNATTEND) and b"cidata" in seed and b"/ata" in seed, seed
    # The RTC keeps the host's local time (TZ of the plugin, far from UTC).
    stamp = datetime.fromisoformat(rtc.decode().strip())
    assert abs(stamp - host_now) < timedelta(minutes=5), (stamp, host_now)
    assert abs(stamp - datetime.now(UTC).replace(tzinfo=None)) > timedelta(hours=12)
    # Hyper-V: dropped under TCG, said so, and the guest sees no Hyper-V.
    assert any(m.startswith("Hyper-V enlightenments dropped") for m in events), events
    assert b"Microsoft Hyper-V" not in hyperv, hyperv
    # The stop went through the guest agent.
    assert any(m.startswith("Shutdown requested through the guest agent") for m in events), events
    assert (result.result.exit_code, result.err) == (0, ""), result
    assert elapsed < 60, elapsed
    assert not vm_processes_under(short_tmp)
    # The TPM's state stays with the task (for a restart in the same allocation).
    assert (alloc / "win" / "nomad-vm-tpm" / "tpm2-00.permall").exists()
    assert sorted(p.name for p in (alloc / "win").iterdir()) == ["local", "nomad-vm-tpm"]

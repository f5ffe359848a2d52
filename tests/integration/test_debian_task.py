"""A Debian cloud guest as a task through the real plugin: thin copy of the image, the guest's own
kernel with root on the disk, a cloud-init seed, the guest agent, and a graceful ACPI stop.

Slow (a Debian boot under TCG is about a minute): one VM for the whole module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import FifoReader, configure, drv, task_config
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until

MARKER = "nomad-vm-cmds-ran"


def test_debian_guest_with_cloud_init_agent_and_acpi_stop(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    base_digest = hashlib.sha256(debian_guest.disk.read_bytes()).hexdigest()
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)])
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "web").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        "image": str(debian_guest.disk),
        "kernel": str(debian_guest.vmlinux),
        "initramfs": str(debian_guest.initrd),
        "cmdline": debian_guest.cmdline,
        # The task environment reaches the guest as /etc/profile.d/nomad-env.sh.
        "cmds": [f". /etc/profile.d/nomad-env.sh; echo {MARKER} $NOMAD_TASK_NAME > /dev/ttyS0"],
        "default_user_password": "s3cret-pass",
        "hostname": "web-1",
    }
    cfg = task_config(alloc, config, task_id="alloc/web/deb1")
    cfg.name = "web"
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    cfg.env["NOMAD_TASK_NAME"] = "web"
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        (runtime,) = (alloc / "web").glob("nomad-vm-*")
        seed = runtime / "cidata.iso"
        assert seed.stat().st_mode & 0o777 == 0o600
        assert b"s3cret-pass" not in seed.read_bytes()
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 240), events
        assert fifo.wait_for(MARKER.encode() + b" web", 240), bytes(fifo.data[-3000:])
        elapsed = stop(plugin, cfg.id, 60)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    assert (result.result.exit_code, result.err) == (0, "")
    assert elapsed < 45, f"ACPI shutdown of Debian took {elapsed:.0f}s"
    assert any(m.startswith("Disk prepared: thin copy") for m in events), events
    assert not any("terminated" in m for m in events), events
    assert not qemu_processes_under(short_tmp)
    assert list((alloc / "web").iterdir()) == []
    assert hashlib.sha256(debian_guest.disk.read_bytes()).hexdigest() == base_digest


def test_debian_guest_boots_from_its_disk_alone(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    """No kernel option: SeaBIOS boots the task's disk (extlinux on the image)."""
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)])
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {"image": str(debian_guest.disk), "cloud_init": False}
    cfg = task_config(alloc, config, task_id="alloc/tiny/disk1")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        (runtime,) = (alloc / "tiny").glob("nomad-vm-*")
        assert not (runtime / "cidata.iso").exists()  # cloud_init = false
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 240), events
        assert b"SYSLINUX" in fifo.data, bytes(fifo.data[:2000])
        stop(plugin, cfg.id, 60)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    assert (result.result.exit_code, result.err) == (0, "")
    assert not qemu_processes_under(short_tmp)

"""VM lifecycle through the real plugin process: graceful stop, exit kinds, reboot in place."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under, wait_until
from tests.integration.pluginkit import drv, tiny_task

RUNNING = b"nomad-vm tiny guest: running"


def collect_events(plugin: PluginProcess) -> tuple[grpc.Future, list[str]]:  # type: ignore[type-arg]
    """Start a TaskEvents stream whose messages accumulate in the returned list."""
    import threading

    stream = drv(plugin).TaskEvents(driver_pb2.TaskEventsRequest())
    messages: list[str] = []

    def pump() -> None:
        try:
            for event in stream:
                messages.append(event.message)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return stream, messages


def stop(plugin: PluginProcess, task_id: str, seconds: int) -> float:
    started = time.monotonic()
    drv(plugin).StopTask(
        driver_pb2.StopTaskRequest(task_id=task_id, timeout=duration_pb2.Duration(seconds=seconds))
    )
    return time.monotonic() - started


def wait(plugin: PluginProcess, task_id: str, timeout: float = 60) -> driver_pb2.WaitTaskResponse:
    return drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=task_id), timeout=timeout)


def destroy(plugin: PluginProcess, task_id: str) -> None:
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task_id, force=True))


def test_acpi_stop_powers_the_guest_off(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="acpi") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        elapsed = stop(plugin, cfg.id, 20)
        result = wait(plugin, cfg.id)
        assert fifo.wait_for(b"power button pressed", 5)
        destroy(plugin, cfg.id)
    stream.cancel()
    assert elapsed < 15, f"graceful stop took {elapsed:.1f}s"
    assert (result.result.exit_code, result.result.signal, result.err) == (0, 0, "")
    assert wait_until(lambda: any("Guest powered off" in m for m in events), 5), events
    assert any(m.startswith("ACPI shutdown requested") for m in events), events
    assert not any("terminated" in m for m in events), events
    assert not qemu_processes_under(short_tmp)


def test_guest_reboot_keeps_the_same_vm(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """`reboot -f` in the guest resets the VM in place: same task, same QEMU process."""
    stream, events = collect_events(plugin)
    run = "echo about-to-reboot; reboot -f"
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="reboot", run=run) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        (qemu,) = qemu_processes_under(short_tmp)
        assert wait_until(lambda: any("Guest rebooted" in m for m in events), 120), events
        assert wait_until(lambda: fifo.data.count(b"about-to-reboot") >= 2, 120)
        assert [p.pid for p in qemu_processes_under(short_tmp)] == [qemu.pid]
        status = drv(plugin).InspectTask(driver_pb2.InspectTaskRequest(task_id=cfg.id))
        assert status.task.state == driver_pb2.RUNNING
        stop(plugin, cfg.id, 2)
        wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    stream.cancel()


def _run_to_completion(
    plugin: PluginProcess,
    root: Path,
    guest,
    name: str,
    run: str,
    **kw,  # type: ignore[no-untyped-def]
) -> tuple[driver_pb2.WaitTaskResponse, bytes]:
    """Start a tiny guest running ``run``, wait for the VM to end; (result, console)."""
    with tiny_task(plugin, root, guest, alloc_name=name, run=run, **kw) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        result = wait(plugin, cfg.id, timeout=180)
        fifo.wait_for(b"no-such-marker", 1)  # let the last console bytes arrive
        destroy(plugin, cfg.id)
        return result, bytes(fifo.data)


def test_guest_kernel_panic_is_a_failed_exit(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    result, _ = _run_to_completion(
        plugin, short_tmp, tiny_guest, "panic", "echo c > /proc/sysrq-trigger"
    )
    stream.cancel()
    assert result.result.exit_code != 0
    assert "panicked" in result.err
    assert any("Guest kernel panicked" in m for m in events), events
    assert not qemu_processes_under(short_tmp)


def test_guest_ignoring_acpi_is_terminated_at_the_timeout(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    stream, events = collect_events(plugin)
    overrides = {"cmdline": f"{tiny_guest.cmdline} nomadvm.ignore_acpi=1"}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="deaf", overrides=overrides) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        elapsed = stop(plugin, cfg.id, 3)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    stream.cancel()
    assert 3.0 <= elapsed < 9.0, f"stopped after {elapsed:.1f}s, kill_timeout was 3s"
    assert result.result.signal != 0 and result.err == ""  # our own stop, not a crash
    assert any("did not stop within 3s, VM terminated" in m for m in events), events


def test_disk_thin_copy_resize_and_base_untouched(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The guest sees the grown disk and writes to it; the base image stays byte-identical."""
    import hashlib

    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMDISK!" + bytes(64 * 1024 * 1024 - 8))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    run = (
        "echo size=$(cat /sys/block/vda/size); head -c 8 /dev/vda; echo; "
        "echo written-by-guest | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null; echo wrote"
    )
    for thin in (True, False):
        overrides = {"image": str(base), "use_thin_copy": thin, "primary_disk_size": 128}
        result, console = _run_to_completion(
            plugin,
            short_tmp,
            tiny_guest,
            f"disk{int(thin)}",
            run,
            overrides=overrides,
            image_paths=[str(tiny_guest.vmlinux.parent), str(images)],
        )
        assert result.result.exit_code == 0, (result, console[-1500:])
        assert b"size=262144" in console, console[-1500:]  # 128 MiB in 512-byte sectors
        assert b"NVMDISK!" in console and b"wrote" in console
        assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def test_stats_include_the_guests_own_memory_use(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """RSS is QEMU's footprint on the host; USAGE is what the guest reports via its balloon."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="mem") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        stats = drv(plugin).TaskStats(
            driver_pb2.TaskStatsRequest(
                task_id=cfg.id, collection_interval=duration_pb2.Duration(seconds=1)
            )
        )
        memory = None
        deadline = time.monotonic() + 30
        for sample in stats:
            memory = sample.stats.agg_resource_usage.memory
            if driver_pb2.MemoryUsage.USAGE in memory.measured_fields or (
                time.monotonic() > deadline
            ):
                break
        stats.cancel()
        stop(plugin, cfg.id, 10)
        wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    assert memory is not None
    assert driver_pb2.MemoryUsage.USAGE in memory.measured_fields, memory
    # The guest has 160 MB; a busybox initramfs uses a small part of it.
    assert 0 < memory.usage < 160 * 1024 * 1024
    assert memory.rss > 0


def test_exec_and_signals_without_a_guest_agent_fail_clearly(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The tiny guest runs no qemu-guest-agent: exec must fail fast and say why, not hang."""
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="noagent") as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).ExecTask(
                driver_pb2.ExecTaskRequest(task_id=cfg.id, command=["true"]), timeout=30
            )
        assert time.monotonic() - started < 10
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "qemu-guest-agent" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGHUP"))
        assert "SIGHUP" in err.value.details()
        # SIGTERM means "shut the machine down": the tiny guest honours the power button.
        drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGTERM"))
        assert (wait(plugin, cfg.id).result.exit_code) == 0
        destroy(plugin, cfg.id)


def test_disk_blocks_each_reach_the_guest_with_size_serial_and_bus(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Several `disk` blocks: an overlay on an image (grown), an empty raw disk, a read-only
    copy, and disks and cdroms on the sata, scsi and (pc) ide buses. The guest sees each
    virtio disk with its size and serial, cannot write the read-only one, and has the AHCI
    and virtio-scsi controllers (the tiny guest has no driver for their disks: QEMU
    accepting them is the check); the image stays untouched."""
    import hashlib

    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMDISK!" + bytes(32 * 1024 * 1024 - 8))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    disks = [
        {"size": "20MB", "devname": "scratch", "format": "raw"},
        {
            "primary": True,
            "size": "64MiB",
            "chained": True,
            "devname": "root",
            "source": {"image": str(base), "format": "raw"},
        },
        {"read_only": True, "devname": "ro-data", "source": {"image": str(base)}},
        {"size": "16MiB", "bus_type": "sata", "driver": "writethrough"},
        {"size": "8388608", "bus_type": "scsi", "driver": "unsafe", "sparse": False},
        {"size": "4MiB", "bus_type": "ide"},
        {"kind": "cdrom", "bus_type": "ide", "source": {"image": str(base)}},
        {"kind": "cdrom", "bus_type": "scsi", "chained": True, "source": {"image": str(base)}},
    ]
    run = (
        "for d in /sys/block/vd*; do echo disk $(basename $d) $(cat $d/size) $(cat $d/serial);"
        " done; head -c 8 /dev/vda; echo; "
        "echo x | dd of=/dev/vdc conv=fsync 2>/dev/null || echo ro-refused; "
        "echo pci $(cat /sys/bus/pci/devices/*/device | tr '\\n' ' ')"
    )
    result, console = _run_to_completion(
        plugin,
        short_tmp,
        tiny_guest,
        "disks",
        run,
        overrides={"disk": disks, "cloud_init": False},
        image_paths=[str(tiny_guest.vmlinux.parent), str(images)],
    )
    text = console.decode(errors="replace")
    assert result.result.exit_code == 0, (result, text[-2000:])
    # The primary first (64 MiB), then the blocks' order: 20 MB rounded up to 20 MiB, the
    # read-only copy at the image's 32 MiB. Sizes in 512-byte sectors.
    assert "disk vda 131072 root" in text, text[-2000:]
    assert "disk vdb 40960 scratch" in text, text[-2000:]
    assert "disk vdc 65536 ro-data" in text, text[-2000:]
    assert "disk vdd" not in text  # sata and scsi disks are not virtio-blk
    assert "NVMDISK!" in text and "ro-refused" in text
    pci = next(line for line in text.splitlines() if line.startswith("pci "))
    assert "0x2922" in pci  # ICH9 AHCI
    assert "0x1004" in pci or "0x1048" in pci  # virtio-scsi (legacy or modern id)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    # Every disk file the start made was removed with the task.
    assert not [p for p in short_tmp.rglob("disk*.*") if p.is_file()]


def test_directory_pool_volumes_outlive_their_tasks(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A named volume in a directory pool keeps what one task's guest wrote for the next; a
    chained clone of it leaves it untouched; a source image written into the pool is made
    once and reused by the next task with the same source."""
    pool = short_tmp / "pool"
    images = short_tmp / "images"
    images.mkdir()
    base = images / "base.raw"
    base.write_bytes(b"NVMBASE!" + bytes(16 * 1024 * 1024 - 8))
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]

    def run(name: str, disks: list[dict[str, object]], command: str) -> str:
        result, console = _run_to_completion(
            plugin,
            short_tmp,
            tiny_guest,
            name,
            command,
            overrides={"disk": disks},
            image_paths=paths,
            plugin_options=options,
        )
        text = console.decode(errors="replace")
        assert result.result.exit_code == 0, (result, text[-2000:])
        return text

    data = [{"pool": "local", "name": "data", "size": "8MiB", "format": "raw"}]
    write = "echo persisted-marker | dd of=/dev/vda conv=fsync 2>/dev/null && echo wrote"
    assert "wrote" in run("pool1", data, write)
    assert (pool / "data").read_bytes().startswith(b"persisted-marker")
    assert "persisted-marker" in run("pool2", data, "head -c 16 /dev/vda; echo")

    # A chained clone (the default pool): sees the volume, writes only to its overlay.
    clone = [{"chained": True, "source": {"volume": "data"}}]
    text = run(
        "pool3",
        clone,
        "head -c 16 /dev/vda; echo; echo overwritten | dd of=/dev/vda conv=fsync 2>/dev/null",
    )
    assert "persisted-marker" in text
    assert (pool / "data").read_bytes().startswith(b"persisted-marker")

    from_image = [{"pool": "local", "chained": True, "source": {"image": str(base)}}]
    inodes = set()
    for name in ("pool4", "pool5"):
        assert "NVMBASE!" in run(name, from_image, "head -c 8 /dev/vda; echo")
        imported = [p for p in pool.iterdir() if p.name.startswith("base-")]
        assert len(imported) == 1, sorted(pool.iterdir())
        inodes.add(imported[0].stat().st_ino)
    assert len(inodes) == 1  # the second task reused the first one's volume
    # Only the volumes: no in-progress file, no task disk left in the pool.
    assert sorted(p.name for p in pool.iterdir()) == sorted(["data", imported[0].name])
    assert oct(pool.stat().st_mode & 0o777) == "0o700"
    assert not [p for p in short_tmp.rglob("disk*.*") if p.is_file()]


def test_a_disk_cannot_leave_its_pool(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A volume name is one component of the pool, and a symlink in the pool leads nowhere."""
    pool = short_tmp / "pool"
    pool.mkdir(mode=0o700)
    outside = short_tmp / "secret.raw"
    outside.write_bytes(b"SECRET!!" + bytes(1024 * 1024))
    (pool / "link").symlink_to(outside)
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    for name, disk, field in (
        ("esc1", {"name": "../secret.raw", "size": "1MiB"}, "config.disk[0].name"),
        ("esc2", {"source": {"volume": "link"}}, "config.disk[0].source.volume"),
        ("esc3", {"name": "link"}, "config.disk[0].name"),
    ):
        with tiny_task(
            plugin,
            short_tmp,
            tiny_guest,
            alloc_name=name,
            overrides={"disk": [disk]},
            plugin_options=options,
        ) as (cfg, _, _):
            with pytest.raises(grpc.RpcError) as err:
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert field in str(err.value.details()), err.value.details()
            destroy(plugin, cfg.id)
    assert sorted(p.name for p in pool.iterdir()) == ["link"]
    assert outside.read_bytes().startswith(b"SECRET!!")


def test_a_pool_volume_in_use_is_refused_to_a_second_task(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Two running VMs writing one volume would corrupt it: QEMU's image lock (on the
    descriptor the plugin handed it) refuses the second, and the first runs on."""
    pool = short_tmp / "pool"
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    disks = [{"pool": "local", "name": "shared", "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="lock1", overrides={"disk": disks},
        plugin_options=options,
    ) as (first, fifo, _):  # fmt: skip
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=first), timeout=60)
        assert fifo.wait_for(RUNNING, 120)
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="lock2", overrides={"disk": disks},
            plugin_options=options,
        ) as (second, _, _):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=second), timeout=60)
            assert "lock" in str(err.value.details()), err.value.details()
            destroy(plugin, second.id)
        stop(plugin, first.id, 5)
        wait(plugin, first.id)
        destroy(plugin, first.id)
    assert sorted(p.name for p in pool.iterdir()) == ["shared"]

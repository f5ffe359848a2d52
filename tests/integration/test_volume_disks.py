"""`disk { volume = "<name>" }` with real qemu-img and QEMU (the tiny guest, through the real
plugin process): the task's mounts are set as Nomad sets them (with `request_name` as Nomad
2.0.1+ sends it, or without, as 1.x does). A directory volume gets its disk file on first use
and the next task sees what the guest wrote; a read-only mount gives a read-only disk; a file
or block device is the disk itself; a symlink planted in a directory volume is not followed;
bad input leaves nothing, and the driver never removes the volume's data."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.storage.tools import find_qemu_img
from tests.conftest import qemu_processes_under, vm_processes_under, wait_until
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_refused_config import refused, tree
from tests.integration.test_vm_lifecycle import RUNNING, collect_events, destroy, stop, wait

pytestmark = pytest.mark.integration

WRITE = "echo volume-marker | dd of=/dev/vda conv=fsync 2>/dev/null && echo wrote"
READ = "head -c 13 /dev/vda; echo; echo size=$(cat /sys/block/vda/size)"


def mount(host: Path, dest: str, *, readonly: bool = False, name: str = "") -> driver_pb2.Mount:
    return driver_pb2.Mount(
        task_path=dest, host_path=str(host), readonly=readonly, request_name=name
    )


def run_vm(
    plugin: PluginProcess,
    root: Path,
    guest,  # type: ignore[no-untyped-def]
    alloc: str,
    command: str,
    disks: list[dict[str, object]],
    mounts: list[driver_pb2.Mount],
) -> str:
    """Start the tiny guest with ``disks`` and ``mounts``, run ``command``, wait for its end;
    the console text (the exit must be clean)."""
    with tiny_task(
        plugin, root, guest, alloc_name=alloc, run=command, overrides={"disk": disks}
    ) as (cfg, fifo, _):
        cfg.mounts.extend(mounts)
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        result = wait(plugin, cfg.id, timeout=180)
        fifo.wait_for(b"no-such-marker", 1)  # let the last console bytes arrive
        destroy(plugin, cfg.id)
        text = bytes(fifo.data).decode(errors="replace")
    assert result.result.exit_code == 0, (result, text[-2000:])
    return text


def test_a_directory_volume_keeps_the_disk_for_the_next_task(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The first task (Nomad 1.x: matched by its destination) makes the disk file and writes
    a marker; the second (matched by request_name, any destination) reads it; a read-only
    mount gives a read-only disk that still reads it."""
    volume = short_tmp / "vol"
    volume.mkdir()
    stream, events = collect_events(plugin)
    disks = [{"volume": "data", "size": "8MiB", "format": "raw"}]
    text = run_vm(
        plugin, short_tmp, tiny_guest, "vol1", WRITE, disks, [mount(volume, "/volumes/data")]
    )
    assert "wrote" in text
    assert sorted(p.name for p in volume.iterdir()) == ["nomad-vm-disk.raw"]
    assert (volume / "nomad-vm-disk.raw").read_bytes().startswith(b"volume-marker")

    text = run_vm(
        plugin, short_tmp, tiny_guest, "vol2", READ, disks, [mount(volume, "/mnt/x", name="data")]
    )
    assert "volume-marker" in text and "size=16384" in text, text[-2000:]

    ro = [mount(volume, "/volumes/data", readonly=True, name="data")]
    attempt = READ + "; echo x | dd of=/dev/vda conv=fsync 2>/dev/null || echo ro-refused"
    text = run_vm(plugin, short_tmp, tiny_guest, "vol3", attempt, disks, ro)
    assert "volume-marker" in text and "ro-refused" in text, text[-2000:]
    stream.cancel()
    prepared = [e for e in events if "Nomad volume data" in e]
    assert prepared == [
        "Disk prepared: Nomad volume data, new disk file nomad-vm-disk.raw, raw, 8 MB",
        "Disk prepared: Nomad volume data, existing disk file nomad-vm-disk.raw, raw, 8 MB",
        "Disk prepared: Nomad volume data, existing disk file nomad-vm-disk.raw, raw, 8 MB, "
        "read-only (its volume_mount is read-only)",
    ], events
    # The volume's data outlived all three tasks, and nothing else was left in it.
    assert sorted(p.name for p in volume.iterdir()) == ["nomad-vm-disk.raw"]
    assert (volume / "nomad-vm-disk.raw").read_bytes().startswith(b"volume-marker")


def test_the_disk_s_mount_is_not_also_a_shared_directory(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Of two volume_mounts, the one backing the disk (the first) becomes no share; the other
    is shared as before (its tag on QEMU's command line)."""
    volume, www = short_tmp / "vol", short_tmp / "www"
    volume.mkdir()
    www.mkdir()
    disks = [{"volume": "data", "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="share", overrides={"disk": disks}
    ) as (cfg, fifo, _):
        cfg.mounts.extend([mount(volume, "/volumes/data"), mount(www, "/srv/www")])
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120)
            (qemu,) = qemu_processes_under(short_tmp)
            argv = " ".join(qemu.cmdline())
        finally:
            stop(plugin, cfg.id, 5)
            wait(plugin, cfg.id)
            destroy(plugin, cfg.id)
    assert "nomad-vol1" in argv and "nomad-vol0" not in argv, argv
    assert (volume / "nomad-vm-disk.qcow2").is_file()


def test_a_qcow2_file_volume_is_the_disk(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A host volume that is a file: its format detected (qcow2), written in place."""
    disk = short_tmp / "data.qcow2"
    subprocess.run([str(find_qemu_img()), "create", "-q", "-f", "qcow2", str(disk), "4M"],
                   check=True)  # fmt: skip
    disks = [{"volume": "data"}]
    text = run_vm(plugin, short_tmp, tiny_guest, "file1", WRITE, disks, [mount(disk, "/v/data")])
    assert "wrote" in text
    text = run_vm(plugin, short_tmp, tiny_guest, "file2", READ, disks, [mount(disk, "/v/data")])
    assert "volume-marker" in text and "size=8192" in text, text[-2000:]
    info = subprocess.run([str(find_qemu_img()), "info", str(disk)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    assert "file format: qcow2" in info


@pytest.fixture
def loop_device(short_tmp: Path) -> Iterator[Path]:
    backing = short_tmp / "loop.raw"
    backing.write_bytes(bytes(4 * 1024 * 1024))
    try:
        out = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device: {exc}")
    device = Path(out.strip())
    yield device
    subprocess.run(["losetup", "-d", str(device)], check=True)


def test_a_block_device_volume_is_the_disk(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    loop_device: Path,
) -> None:
    disks = [{"volume": "blk", "format": "raw"}]
    mounts = [mount(loop_device, "/volumes/blk")]
    assert "wrote" in run_vm(plugin, short_tmp, tiny_guest, "blk1", WRITE, disks, mounts)
    assert (short_tmp / "loop.raw").read_bytes().startswith(b"volume-marker")
    text = run_vm(plugin, short_tmp, tiny_guest, "blk2", READ, disks, mounts)
    assert "volume-marker" in text and "size=8192" in text, text[-2000:]


def test_a_block_device_s_format_is_detected_at_each_start(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    loop_device: Path,
) -> None:
    """Without `format`, qemu-img looks at the device at every start: a device written other
    than through its node (here: the loop device's backing file) shows no change in its
    stat, so what qemu-img said last time must not be reused."""
    disks = [{"volume": "blk"}]
    mounts = [mount(loop_device, "/volumes/blk")]
    before = loop_device.stat()
    assert "size=8192" in run_vm(plugin, short_tmp, tiny_guest, "probe1", READ, disks, mounts)
    header = short_tmp / "header.qcow2"
    subprocess.run([str(find_qemu_img()), "create", "-q", "-f", "qcow2", str(header), "2M"],
                   check=True)  # fmt: skip
    with open(short_tmp / "loop.raw", "r+b") as backing:
        backing.write(header.read_bytes())
    subprocess.run(["blockdev", "--flushbufs", str(loop_device)], check=True)
    after = loop_device.stat()
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    text = run_vm(plugin, short_tmp, tiny_guest, "probe2", READ, disks, mounts)
    assert "size=4096" in text, text[-2000:]


@pytest.mark.parametrize(
    ("case", "disks", "field", "says"),
    [
        ("symlink", [{"volume": "data", "size": "4MiB"}], "config.disk[0].volume", "symlink"),
        ("hardlink", [{"volume": "data", "size": "4MiB"}], "config.disk[0].volume",
         "2 hard links"),
        ("nosize", [{"volume": "data"}], "config.disk[0].size", "give the size"),
        ("nomount", [{"volume": "other", "size": "4MiB"}], "config.disk[0].volume",
         'destination = "/volumes/other"'),
        ("readonly", [{"volume": "data", "size": "4MiB", "read_only": True}],
         "config.disk[0].volume", "read-only disk cannot be made"),
    ],
)  # fmt: skip
def test_bad_volume_disks_are_refused_leaving_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    case: str,
    disks: list[dict[str, object]],
    field: str,
    says: str,
) -> None:
    """A symlink or a hard link planted under the disk file's name in a directory volume is
    refused, not followed (the secret it leads to is untouched); a missing size, a volume no mount
    matches and a read-only disk that does not exist yet are refused naming the field. No
    file is left in the volume, the task dir or the plugin's state."""
    volume = short_tmp / "vol"
    volume.mkdir()
    secret = short_tmp / "secret.raw"
    secret.write_bytes(b"SECRET!!" + bytes(1024 * 1024))
    if case == "symlink":
        (volume / "nomad-vm-disk.qcow2").symlink_to(secret)
    if case == "hardlink":
        (volume / "nomad-vm-disk.qcow2").hardlink_to(secret)
    before = tree(volume)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name=case, overrides={"disk": disks}
    ) as (cfg, _, alloc):
        cfg.mounts.append(mount(volume, "/volumes/data"))
        err = refused(plugin, cfg)
        assert field in str(err.details()) and says in str(err.details()), err.details()
        assert err.code() != grpc.StatusCode.OK
        destroy(plugin, cfg.id)
    assert tree(volume) == before
    assert secret.read_bytes().startswith(b"SECRET!!")
    assert not vm_processes_under(short_tmp)
    assert tree(alloc / "tiny") == []
    assert tree(short_tmp / "data" / "run") == []
    assert [p for p in (short_tmp / "data").rglob("*.msgpack")] == []


def test_a_plugin_killed_while_making_the_disk_file_leaves_the_volume_empty(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """Fault injection: qemu-img (a wrapper around the real one) has written the new disk
    under its hidden name and then hangs; the plugin is SIGKILLed there. The fresh plugin's
    DestroyTask (all Nomad sends for a start it got no answer to) removes the hidden file:
    the volume holds no half-made disk, and the next start would make it afresh."""
    import os
    import signal

    from tests.integration.pluginkit import DRIVER, configure

    volume = short_tmp / "vol"
    volume.mkdir()
    tools = short_tmp / "bin"
    tools.mkdir()
    hung = short_tmp / "qemu-img-hung"
    wrapper = tools / "qemu-img"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = create ]; then "{find_qemu_img()}" "$@" || exit 1\n'
        f"  echo $$ > {hung}.tmp && mv {hung}.tmp {hung}; exec sleep 600\nfi\n"
        f'exec "{find_qemu_img()}" "$@"\n'
    )
    wrapper.chmod(0o755)
    first = PluginProcess([str(DRIVER)], env={"PATH": f"{tools}:{os.environ['PATH']}"})
    first.start(short_tmp / "plugin1.stderr")
    disks = [{"volume": "data", "size": "4MiB"}]
    try:
        with tiny_task(
            first, short_tmp, tiny_guest, alloc_name="kill", overrides={"disk": disks}
        ) as (cfg, _, alloc):
            cfg.mounts.append(mount(volume, "/volumes/data"))
            call = drv(first).StartTask.future(
                driver_pb2.StartTaskRequest(task=cfg), timeout=120
            )
            assert wait_until(hung.exists, 120), call
            (made,) = volume.iterdir()
            assert made.name.startswith(".nomad-vm-") and made.name.endswith(".part")
            assert first.process is not None
            first.process.kill()  # SIGKILL: no clean-up of any kind
            assert first.wait_exit(10) is not None
            with pytest.raises(grpc.RpcError):
                call.result()
            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            try:
                configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
                destroy(second, cfg.id)
            finally:
                second.kill()
    finally:
        first.kill()
        if hung.exists():
            os.kill(int(hung.read_text()), signal.SIGKILL)  # the hung wrapper, ours
    assert tree(volume) == []
    assert tree(alloc / "tiny") == []
    assert [p for p in (short_tmp / "data").rglob("*.msgpack")] == []

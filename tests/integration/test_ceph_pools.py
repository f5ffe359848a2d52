"""Ceph storage pools with a real single-node Ceph cluster (``tests.ceph_cluster``), real
QEMU (its own librbd) and the real plugin process: what the guest sees of RBD disks, what
stays in the pool, what goes with the task, and where the cephx key never appears."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.ceph_cluster import CephCluster
from tests.conftest import qemu_processes_under, wait_until
from tests.integration.pluginkit import drv, tiny_task
from tests.integration.test_vm_lifecycle import RUNNING, _run_to_completion, destroy, stop, wait

POOL = "rbd-pool"
# A well-formed cephx key that is not the user's (the virt seed's example key).
WRONG_KEY = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="


def ceph_options(
    c: CephCluster, secret: str | None = None, hosts: list[str] | None = None
) -> dict[str, object]:
    return {
        "storage_pools": {
            "ceph": {
                POOL: {
                    "pool": c.pool,
                    "hosts": hosts or c.monitors,
                    "authentication": {"username": c.username, "secret": secret or c.secret},
                }
            }
        }
    }


def export_head(c: CephCluster, image: str, size: int = 32) -> bytes:
    """The first bytes of an RBD image, read by the admin (not through the plugin)."""
    out = subprocess.run(
        ["rbd", "-c", str(c.conf), "export", "--no-progress", f"{c.pool}/{image}", "-"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out.stdout[:size]


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Files under ``root`` that contain ``needle`` (the key must be in none: not in a log,
    a journal, a runtime dir, whatever its mode)."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def test_rbd_volume_persists_clone_leaves_parent_and_task_images_go(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    """A named RBD volume keeps what one task's guest wrote for the next; a chained clone
    sees it and writes only to itself; a task's own RBD disk is removed with the task; the
    key is never in QEMU's command line, the plugin's log or a file."""
    c = ceph_cluster
    admin = c.admin
    before = admin.images()
    options = ceph_options(c)

    def run(name: str, disks: list[dict[str, object]], command: str) -> str:
        result, console = _run_to_completion(
            plugin, short_tmp, tiny_guest, name, command, overrides={"disk": disks},
            plugin_options=options,
        )  # fmt: skip
        text = console.decode(errors="replace")
        assert result.result.exit_code == 0, (result, text[-2000:])
        return text

    data = [
        {"pool": POOL, "name": "data", "size": "8MiB", "devname": "data"},
        {"pool": POOL, "size": "4MiB", "devname": "scratch"},
    ]
    write = (
        "for d in /sys/block/vd*; do echo disk $(basename $d) $(cat $d/size) $(cat $d/serial);"
        " done; echo ceph-marker | dd of=/dev/vda conv=fsync 2>/dev/null && echo wrote"
    )
    text = run("ceph1", data, write)
    assert "wrote" in text and "disk vda 16384 data" in text, text[-2000:]
    assert "disk vdb 8192 scratch" in text, text[-2000:]
    assert export_head(c, "data").startswith(b"ceph-marker")
    # The task's own image (the scratch disk) went with it; the named volume stays.
    assert admin.images() == sorted({*before, "data"})

    assert "ceph-marker" in run("ceph2", data[:1], "head -c 11 /dev/vda; echo")

    # A chained clone, grown: 16 MiB of the 8 MiB volume.
    clone = [{"pool": POOL, "chained": True, "size": "16MiB", "source": {"volume": "data"}}]
    text = run(
        "ceph3",
        clone,
        "echo size $(cat /sys/block/vda/size); head -c 11 /dev/vda; echo; "
        "echo overwritten | dd of=/dev/vda conv=fsync 2>/dev/null",
    )
    assert "ceph-marker" in text and "size 32768" in text, text[-2000:]
    assert export_head(c, "data").startswith(b"ceph-marker")
    # The clone and the snapshot it hung from are gone with the task.
    assert admin.images() == sorted({*before, "data"})
    assert admin.snapshots("data") == []
    assert not qemu_processes_under(short_tmp)


def test_the_key_is_in_no_argv_log_or_readable_file(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    """While a VM runs on an RBD disk: QEMU's command line names a descriptor, not the key;
    the descriptor QEMU reads it from is a memfd owned by QEMU's user, mode 0400; the plugin's
    log, the task's journal and every file under the test's directories hold no key."""
    c = ceph_cluster
    disks = [{"pool": POOL, "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="key", overrides={"disk": disks},
        plugin_options=ceph_options(c),
    ) as (cfg, fifo, _):  # fmt: skip
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        assert fifo.wait_for(RUNNING, 180)
        (qemu,) = qemu_processes_under(short_tmp)
        cmdline = Path(f"/proc/{qemu.pid}/cmdline").read_bytes()
        assert c.secret.encode() not in cmdline
        assert b"secret,id=disk0-key,file=/proc/self/fd/" in cmdline
        fd = cmdline.split(b"file=/proc/self/fd/")[1].split(b",")[0].decode()
        link = f"/proc/{qemu.pid}/fd/{fd}"
        assert os.readlink(link).startswith("/memfd:cephx-key")
        st = os.stat(link)
        assert stat.S_IMODE(st.st_mode) == 0o400
        assert st.st_uid == psutil.Process(qemu.pid).uids().real != 0
        assert c.secret not in (os.environ.get("CEPH_ARGS") or "")
        stop(plugin, cfg.id, 5)
        wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    assert not files_containing(short_tmp, c.secret.encode())
    assert c.secret not in (short_tmp / "plugin.stderr").read_text(errors="replace")


@pytest.mark.parametrize("fault", ["wrong-secret", "unreachable-monitor"])
def test_a_wrong_secret_or_unreachable_monitor_is_a_clear_error_leaving_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
    fault: str,
) -> None:
    c = ceph_cluster
    before = c.admin.images()
    if fault == "wrong-secret":
        options, field = ceph_options(c, secret=WRONG_KEY), "authentication"
    else:
        with __import__("socket").socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options, field = ceph_options(c, hosts=[f"127.0.0.1:{port}"]), "hosts"
    disks = [{"pool": POOL, "size": "4MiB"}, {"pool": POOL, "name": "never", "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name=fault, overrides={"disk": disks},
        plugin_options=options,
    ) as (cfg, _, alloc):  # fmt: skip
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        took = time.monotonic() - started
        details = str(err.value.details())
        assert f"Ceph pool {POOL!r}" in details and f"storage_pools.ceph.{POOL}.{field}" in details
        assert took < 30, f"the error took {took:.0f}s"
        # Nothing left: no image, no QEMU, no journal, no runtime dir.
        assert c.admin.images() == before
        assert not qemu_processes_under(short_tmp)
        assert not list((short_tmp / "data").rglob("*.msgpack"))
        assert not [p for p in alloc.rglob("nomad-vm-*") if p.is_dir()]
        destroy(plugin, cfg.id)
    assert c.secret not in (short_tmp / "plugin.stderr").read_text(errors="replace")


@pytest.mark.parametrize("step", ["disk", "vmm-spawned"])
def test_a_plugin_killed_mid_start_leaves_no_rbd_image_after_destroy(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
    step: str,
) -> None:
    """SIGKILL the plugin at a StartTask step (``disk``: the first RBD image is in the journal,
    not yet made; ``vmm-spawned``: every image made, QEMU forked at its gate). Nomad never got
    an answer, so it only calls DestroyTask on a fresh plugin: the task's images and the
    snapshot its clone hangs from are gone; the named volume it made stays."""
    import threading

    from tests.integration.pluginkit import DRIVER, configure

    c = ceph_cluster
    before = c.admin.images()
    if "crash-src" not in before:
        c.admin.run("rbd", "create", "--size", "4", f"{c.pool}/crash-src")
        before = c.admin.images()
    marker = short_tmp / "paused"
    first = PluginProcess([str(DRIVER)], {"NOMAD_VM_TEST_PAUSE_AT": step,
                                          "NOMAD_VM_TEST_PAUSE_MARKER": str(marker)})  # fmt: skip
    first.start(short_tmp / "plugin1.stderr")
    options = ceph_options(c)
    disks = [
        {"pool": POOL, "size": "4MiB"},
        {"pool": POOL, "chained": True, "source": {"volume": "crash-src"}},
        {"pool": POOL, "name": f"kept-{step}", "size": "4MiB"},
    ]
    try:
        with tiny_task(
            first, short_tmp, tiny_guest, alloc_name=f"crash-{step}", overrides={"disk": disks},
            plugin_options=options,
        ) as (cfg, _, _):  # fmt: skip
            outcome: list[object] = []

            def start() -> None:
                try:
                    drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=300)
                except grpc.RpcError as exc:
                    outcome.append(exc)

            starter = threading.Thread(target=start)
            starter.start()
            deadline = time.monotonic() + 180
            while not marker.exists() and time.monotonic() < deadline and starter.is_alive():
                starter.join(0.1)
            assert marker.exists(), outcome
            if step == "vmm-spawned":
                assert len(c.admin.images()) == len(before) + 3  # own disk, clone, named volume
            assert first.process is not None
            first.process.kill()
            assert first.wait_exit(10) is not None
            starter.join(30)
            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            try:
                configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)], **options)
                request = driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True)
                drv(second).DestroyTask(request, timeout=120)
            finally:
                second.kill()
    finally:
        first.kill()
    kept = {f"kept-{step}"} if step == "vmm-spawned" else set()
    assert c.admin.images() == sorted({*before, *kept})
    assert c.admin.snapshots("crash-src") == []
    assert not qemu_processes_under(short_tmp)
    assert not list((short_tmp / "data").rglob("*.msgpack"))


def test_an_rbd_volume_in_use_is_refused_to_a_second_task(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    """Two VMs writing one RBD image would corrupt it: while one runs on the named volume, a
    second task naming it (or cloning it) is refused naming the field; the first runs on."""
    c = ceph_cluster
    before = c.admin.images()
    options = ceph_options(c)
    disks = [{"pool": POOL, "name": "shared", "size": "4MiB"}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="use1", overrides={"disk": disks},
        plugin_options=options,
    ) as (first, fifo, _):  # fmt: skip
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=first), timeout=120)
        assert fifo.wait_for(RUNNING, 180)
        for name, disk, field in (
            ("use2", disks[0], "config.disk[0].name"),
            ("use3", {"pool": POOL, "chained": True, "source": {"volume": "shared"}},
             "config.disk[0].source.volume"),
        ):  # fmt: skip
            with tiny_task(
                plugin, short_tmp, tiny_guest, alloc_name=name, overrides={"disk": [disk]},
                plugin_options=options,
            ) as (second, _, _):  # fmt: skip
                with pytest.raises(grpc.RpcError) as err:
                    drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=second), timeout=120)
                details = str(err.value.details())
                assert field in details and "in use" in details, details
                destroy(plugin, second.id)
        assert c.admin.snapshots("shared") == []
        assert [p.pid for p in qemu_processes_under(short_tmp)]  # the first VM runs on
        stop(plugin, first.id, 5)
        wait(plugin, first.id)
        destroy(plugin, first.id)
    assert c.admin.images() == sorted({*before, "shared"})


def test_a_size_below_the_source_is_refused_leaving_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    """A disk is never shrunk: a clone asked to be smaller than its source fails naming
    `size`, and the clone and the snapshot it hung from are removed."""
    c = ceph_cluster
    if "shrink-src" not in c.admin.images():
        c.admin.run("rbd", "create", "--size", "8", f"{c.pool}/shrink-src")
    before = c.admin.images()
    disks = [{"pool": POOL, "chained": True, "size": "4MiB", "source": {"volume": "shrink-src"}}]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="shrink", overrides={"disk": disks},
        plugin_options=ceph_options(c),
    ) as (cfg, _, _):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        details = str(err.value.details())
        assert "config.disk[0].size" in details and "never shrunk" in details, details
        assert c.admin.images() == before
        assert c.admin.snapshots("shrink-src") == []
        destroy(plugin, cfg.id)


def test_a_vm_on_rbd_survives_a_plugin_restart_and_its_images_go_with_it(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    """The plugin dies while the VM runs (QEMU holds its RBD disks itself); a fresh plugin
    recovers the task from its handle, the guest still reads and writes its disk, and the
    task's own image goes with DestroyTask, using the pool from the new plugin's config."""
    from tests.integration.pluginkit import DRIVER, configure
    from tests.integration.test_recovery import recover

    c = ceph_cluster
    before = c.admin.images()
    options = ceph_options(c)
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    run = "while :; do echo alive-$(head -c 4 /dev/vda); sleep 1; done"
    try:
        with tiny_task(
            first, short_tmp, tiny_guest, alloc_name="recover", run=run,
            overrides={"disk": [{"pool": POOL, "size": "4MiB"}]}, plugin_options=options,
        ) as (cfg, fifo, _):  # fmt: skip
            reply = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
            assert fifo.wait_for(b"alive-", 180)
            assert len(c.admin.images()) == len(before) + 1
            first.kill()
            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            try:
                configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)], **options)
                reply.handle.config.CopyFrom(cfg)
                recover(second, reply.handle)
                # The guest goes on reading its RBD disk.
                seen = bytes(fifo.data).count(b"alive-")
                assert wait_until(lambda: bytes(fifo.data).count(b"alive-") > seen + 2, 60)
                stop(second, cfg.id, 2)
                wait(second, cfg.id)
                destroy(second, cfg.id)
            finally:
                second.kill()
    finally:
        first.kill()
    assert c.admin.images() == before
    assert not qemu_processes_under(short_tmp)

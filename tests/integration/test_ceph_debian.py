"""The Debian guest booting from RBD disks of a real Ceph cluster (``tests.ceph_cluster``),
through the real plugin: the image imported into the pool once, a named volume that keeps
what the guest wrote for the next task, and a chained clone that leaves its parent as it was.

Slow (three Debian boots under TCG).
"""

from __future__ import annotations

from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.ceph_cluster import CephCluster
from tests.conftest import vm_processes_under
from tests.integration.pluginkit import FifoReader, configure, drv, task_config
from tests.integration.test_ceph_pools import POOL, ceph_options
from tests.integration.test_debian_task import run
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until

MARKER = "written-on-rbd"


def boot(
    plugin: PluginProcess,
    root: Path,
    guest,  # type: ignore[no-untyped-def]
    name: str,
    disk: dict[str, object],
    script: str,
) -> tuple[bytes, list[str]]:
    """Boot the Debian guest with ``disk`` as its root (its kernel given directly), run
    ``script`` in it through the guest agent, stop it; (output, events)."""
    alloc = root / name
    (alloc / "web").mkdir(parents=True)
    config = {
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initrd),
        "cmdline": guest.cmdline,
        "disk": [{"primary": True, **disk}],
    }
    cfg = task_config(alloc, config, task_id=f"alloc/web/{name}")
    cfg.name = "web"
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")  # the console
    stream, events = collect_events(plugin)
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=600)
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 300), events
        out, code = run(plugin, cfg.id, script)
        assert code == 0, out
        # An ACPI shutdown, the VM terminated if the guest has not ended within 60 s (what
        # it wrote is flushed already: the script ran `sync`).
        stop(plugin, cfg.id, 60)
        wait(plugin, cfg.id, timeout=120)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    return out, list(events)


def test_debian_boots_from_rbd_keeps_a_named_volume_and_a_clone_leaves_its_parent(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    c = ceph_cluster
    admin = c.admin
    before = admin.images()
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)], **ceph_options(c))
    root = {"pool": POOL, "name": "deb-root", "chained": True,
            "source": {"image": str(debian_guest.disk)}}  # fmt: skip
    out, events = boot(
        plugin, short_tmp, debian_guest, "rbd1", root,
        f"findmnt -n -o SOURCE /; echo {MARKER} > /var/nomad-marker; sync",
    )  # fmt: skip
    assert out.strip() == b"/dev/vda", out
    assert any("new Ceph volume, RBD clone" in m for m in events), events
    imported = [i for i in admin.images() if i.startswith("disk-")]
    assert len(imported) == 1 and admin.images() == sorted({*before, "deb-root", *imported})

    # The next task names the volume only: it boots what the first one left.
    out, events = boot(
        plugin, short_tmp, debian_guest, "rbd2", {"pool": POOL, "name": "deb-root"},
        "cat /var/nomad-marker",
    )  # fmt: skip
    assert out == f"{MARKER}\n".encode(), out
    assert any("existing Ceph volume deb-root" in m for m in events), events

    # A chained clone of the volume sees the marker and changes only itself: the admin's
    # snapshot of the parent shows no difference afterwards.
    admin.run("rbd", "snap", "create", f"{c.pool}/deb-root@test-before")
    try:
        out, _ = boot(
            plugin, short_tmp, debian_guest, "rbd3",
            {"pool": POOL, "chained": True, "source": {"volume": "deb-root"}},
            "cat /var/nomad-marker; echo changed > /var/nomad-marker; sync",
        )  # fmt: skip
        assert out == f"{MARKER}\n".encode(), out
        diff = admin.json("rbd", "diff", "--from-snap", "test-before", f"{c.pool}/deb-root")
        assert diff == [], diff
    finally:
        admin.run("rbd", "snap", "rm", f"{c.pool}/deb-root@test-before")
    # Only the kept images: the volume and the imported source; no clone, no task snapshot.
    assert admin.images() == sorted({*before, "deb-root", *imported})
    assert [s["name"] for s in admin.snapshots("deb-root")] == []
    assert not vm_processes_under(short_tmp)

"""Seed 002 (nomad-driver-virt's README), "Disk", "Example": "a primary disk in the directory
storage pool and a secondary empty disk in the Ceph storage pool", run as written on a real
Ceph cluster (``tests.ceph_cluster``) and real QEMU, through the real plugin.

The job is the catalogue's file tests/seed_examples/s002_l207_ceph_disk.nomad.hcl (the seed's
text, checked against it by tests/seed_examples/test_catalogue.py; only the artifact's host is
substituted). Nomad itself parses the job (`nomad job run -output`, no agent needed), and the
task's `config` goes to the plugin as the agent would send it; the test puts the Debian test
guest's disk where Nomad's artifact stanza would, under the seed's file name in the task's
`local/` (the artifact is never fetched here). The plugin config defines the two pools the job
names, with the seed's keys and the session cluster's values. The same job through a real
agent: tests/seed_examples/test_seed_002_ceph.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from nomad_vm import schema
from nomad_vm.fields import Field
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.ceph_cluster import CephCluster
from tests.conftest import REPO, vm_processes_under
from tests.integration.pluginkit import FifoReader, configure, drv, task_config
from tests.integration.test_debian_task import run
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until
from tests.seed_examples.catalogue import example

SEED_JOB = example("s002_l207_ceph_disk.nomad.hcl")
IMAGE = "focal-server-cloudimg-amd64.img"  # the artifact's file name in the seed


def nomad_binary() -> str:
    local = REPO / ".tools" / "bin" / "nomad"
    return str(local) if local.exists() else "nomad"


def task_config_of(job_hcl: Path) -> tuple[str, dict[str, object]]:
    """(driver, config) of the job's one task, as Nomad parses the job."""
    env = {**os.environ, "NOMAD_ADDR": "http://127.0.0.1:1"}  # -output contacts no agent
    out = subprocess.run(
        [nomad_binary(), "job", "run", "-output", str(job_hcl)],
        check=True, capture_output=True, text=True, timeout=60, env=env,
    ).stdout  # fmt: skip
    task = json.loads(out)["Job"]["TaskGroups"][0]["Tasks"][0]
    return task["Driver"], _as_spec(task["Config"], schema.TASK_CONFIG.fields)


def _as_spec(value: dict[str, object], fields: tuple[Field, ...]) -> dict[str, object]:
    """Nomad's JSON gives every block as a list; the plugin's spec decodes a single block as
    an object and a repeated one as a list of objects (what the agent sends)."""
    out: dict[str, object] = {}
    by_name = {f.name: f for f in fields}
    for key, item in value.items():
        field = by_name.get(key)
        if field is None or field.type != "block" or not isinstance(item, list):
            out[key] = item
            continue
        blocks = [_as_spec(b, field.fields) for b in item]
        out[key] = blocks if field.repeated else blocks[0]
    return out


def test_seed_002_primary_in_a_directory_pool_and_an_empty_disk_in_ceph(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
    ceph_cluster: CephCluster,
) -> None:
    c = ceph_cluster
    before = c.admin.images()
    # Only parsed: the URL is never fetched (the test places the file itself, below).
    job = SEED_JOB.write(short_tmp, {"ARTIFACTS": "http://127.0.0.1:1"})
    driver, config = task_config_of(job)
    assert driver == "virt"
    pool_dir = short_tmp / "storage"
    configure(
        plugin,
        short_tmp / "data",
        [str(debian_guest.disk.parent)],
        storage_pools={
            "default": "local",
            "directory": {"local": {"path": str(pool_dir)}},
            "ceph": {
                "ceph-storage": {
                    "pool": c.pool,
                    "hosts": c.monitors,
                    "authentication": {"username": c.username, "secret": c.secret},
                }
            },
        },
    )
    alloc = short_tmp / "alloc"
    local = alloc / "virt-task" / "local"
    local.mkdir(parents=True)
    # What Nomad's artifact stanza would have done: the image in the task's local/.
    (local / IMAGE).write_bytes(debian_guest.disk.read_bytes())
    cfg = task_config(alloc, config, task_id="alloc/virt-task/seed002")
    cfg.name = "virt-task"
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")  # the console
    stream, events = collect_events(plugin)
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=600)
        ours = [i for i in c.admin.images() if i not in before]
        assert len(ours) == 1 and ours[0].startswith("nomad-vm-"), ours
        assert c.admin.info(ours[0])["size"] == 19074 * 1024 * 1024  # 20 GB, rounded up to MiB
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 600), events
        out, code = run(plugin, cfg.id, "cat /sys/block/vda/size /sys/block/vdb/size")
        assert code == 0, out
        assert out.split() == [b"20971520", b"39063552"], out  # 10 GiB and 19074 MiB
        # An ACPI shutdown, the VM terminated if the guest has not ended within 60 s (what
        # it wrote is flushed already: the script ran `sync`).
        stop(plugin, cfg.id, 60)
        wait(plugin, cfg.id, timeout=120)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    # The Ceph disk was the task's own: gone with it. The directory pool keeps the image
    # written into it (for the next task with the same source), nothing else.
    assert c.admin.images() == before
    kept = sorted(p.name for p in pool_dir.iterdir())
    stem = IMAGE.removesuffix(".img")
    assert len(kept) == 1 and kept[0].startswith(stem + "-") and kept[0].endswith(".qcow2"), kept
    assert not vm_processes_under(short_tmp)

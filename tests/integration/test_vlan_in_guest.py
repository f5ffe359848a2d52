"""VLAN isolation (``network_interface { vlan = N }``) verified on a kernel that can do it.

The kernel of this machine (and of CI's) is built without CONFIG_BRIDGE_VLAN_FILTERING, so on
the host the driver can only refuse VLANs clearly (test_network_layer.py). Debian's kernel has
it: the Debian test guest runs the driver's own network code (``nomad_vm.network``, with
pyroute2, copied into the task's ``local/`` and so shared at /local) through ``vlan_probe.py``.
The probe builds a VLAN-filtering bridge and TAPs in VLANs 10, 10, 20 and none, attaches to
them as QEMU does, and sends a broadcast frame from a VLAN-10 TAP and from the VLAN-20 one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyroute2
import pytest

import nomad_vm
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.integration.pluginkit import FifoReader, configure, debian_boot, drv, task_config
from tests.integration.test_debian_task import run
from tests.integration.test_vm_lifecycle import collect_events, wait_until

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("vlan_probe.py")
READY = "VLAN-PROBE-READY"


def copy_packages(dest: Path) -> None:
    """What the probe imports: our package (its pure-Python network layer) and pyroute2 (pure
    Python). The guest's python3 is Debian 12's 3.11, the version of this venv."""
    for package in (nomad_vm, pyroute2):
        source = Path(package.__file__).parent  # type: ignore[arg-type]
        shutil.copytree(source, dest / source.name, ignore=shutil.ignore_patterns("__pycache__"))


def test_vlan_ports_isolate_traffic_on_a_vlan_filtering_bridge(
    plugin: PluginProcess, short_tmp: Path, debian_guest: Any
) -> None:
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)])
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    local = alloc / "tiny" / "local"  # task_config names the task "tiny"
    local.mkdir(parents=True)
    copy_packages(local / "py")
    shutil.copy(PROBE, local / PROBE.name)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        **debian_boot(debian_guest),
        "cmds": [f"echo {READY} > /dev/ttyS0"],  # after cloud-init mounted /local
    }
    cfg = task_config(alloc, config, task_id="alloc/probe/vlan1")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 240), events
        assert fifo.wait_for(READY.encode(), 240), bytes(fifo.data[-3000:])
        output, code = run(plugin, cfg.id, f"python3 /local/{PROBE.name} /local/py")
        assert code == 0, output.decode(errors="replace")
        report = json.loads(output.decode().strip().splitlines()[-1])
    finally:
        stream.cancel()
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
        fifo.close()

    assert report["vlan_filtering"] is True
    untagged_in_10 = {"untagged": True}
    # From VLAN 10: only the other VLAN-10 port gets it, untagged (the guest sees plain
    # Ethernet); not VLAN 20, not a port without a VLAN (the bridge's default VLAN 1).
    assert report["sent"]["tapa"] == {"tapb": untagged_in_10, "tapc": None, "tapd": None}
    # From VLAN 20, alone in it: nobody.
    assert report["sent"]["tapc"] == {"tapa": None, "tapb": None, "tapd": None}
    # Each VLAN port is in its VLAN only (PVID, untagged): the default VLAN 1 was removed.
    for port, vid in (("tapa", 10), ("tapb", 10), ("tapc", 20)):
        assert report["vlans"][port] == [{"vid": vid, "pvid": True, "untagged": True}], report
    assert report["vlans"]["tapd"] == [{"vid": 1, "pvid": True, "untagged": True}], report

"""Two installed names on one host, each with a bridged VM and a port forward, at once.

The plugin installed as nomad-driver-virt (`virt`: libvirt's default network, virbr0 with
192.168.122.0/24, with no network block) and as nomad-driver-ch (`ch`: its own bridge) run side
by side in one network namespace the test makes, as on a node with both drop-ins. Each starts a
tiny guest that takes its address by DHCP from its plugin's dnsmasq and serves HTTP through a
forwarded port. Nothing of one may touch the other's: bridges, TAP names, nftables tables,
leases, journals, dnsmasq. Removing one name's VM leaves the other serving.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.identity import ALIASES, ENV_VAR, Identity
from nomad_vm.network import links
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under, wait_until
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, task_config
from tests.integration.test_vm_lifecycle import stop, wait
from tests.integration.test_vm_network import bridge_nic, network_block
from tests.netns import http_get, isolated_namespaces

pytestmark = pytest.mark.integration

GUEST_PORT = 8080
BOOT_TIMEOUT = 180
CH_SUBNET = "10.77.0.0/24"


@dataclass
class Name:
    """One installed name: its plugin in the namespace, its data_dir, its VM."""

    identity: Identity
    plugin: PluginProcess
    data_dir: Path
    host_port: int
    cfg: driver_pb2.TaskConfig | None = None
    fifo: FifoReader | None = None

    @property
    def bridge(self) -> str:
        return self.identity.bridge

    def journals(self) -> list[str]:
        journal = self.data_dir / self.identity.journal_dir
        return sorted(p.name for p in journal.glob("*")) if journal.exists() else []


def _nft_tables(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "tables"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {line.removeprefix("table ").strip() for line in out.stdout.splitlines() if line}


@contextlib.contextmanager
def two_names(root: Path) -> Iterator[tuple[str, Name, Name]]:
    prefixes = ("virbr0", "nomadvm-ch0", "nvirt", "nch")
    with isolated_namespaces(prefixes) as spaces:
        ns = spaces.new()
        names = []
        try:
            for n, alias in enumerate(("virt", "ch")):
                plugin = PluginProcess(["ip", "netns", "exec", ns, str(DRIVER)], {ENV_VAR: alias})
                plugin.start(root / f"{alias}.stderr")
                names.append(Name(ALIASES[alias], plugin, root / f"{alias}-data", 20100 + n))
            yield ns, names[0], names[1]
        finally:
            for name in names:
                if name.cfg is not None and name.plugin.process is not None:
                    with contextlib.suppress(grpc.RpcError):
                        request = driver_pb2.DestroyTaskRequest(task_id=name.cfg.id, force=True)
                        drv(name.plugin).DestroyTask(request, timeout=60)
                if name.fifo is not None:
                    name.fifo.close()
                name.plugin.kill()


def _start_vm(name: Name, root: Path, guest: Any, network: dict[str, object]) -> str:
    """The name's tiny guest on its bridge, serving ``<alias>`` on GUEST_PORT through the
    name's forwarded host port; returns the address its plugin planned."""
    configure(name.plugin, name.data_dir, [str(guest.vmlinux.parent)], network=network)
    alias = name.identity.alias
    alloc = root / f"alloc-{alias}"
    (alloc / "tiny").mkdir(parents=True)
    name.fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    serve = f"mkdir /www && echo {alias} >/www/index.html && httpd -f -p {GUEST_PORT} -h /www"
    config = {
        "kernel": str(guest.vmlinux),
        "initramfs": str(guest.initramfs),
        "cmdline": tiny_cmdline(f"{guest.cmdline} nomadvm.dhcp=1", serve),
        "hostname": f"vm-{alias}",
        "share_task_dirs": False,
        # The virt seed's jobs name libvirt's bridge; the ch one leaves it to the plugin.
        "network_interface": bridge_nic(("http",), name="virbr0" if alias == "virt" else None),
    }
    name.cfg = task_config(alloc, config, f"a1b2c3d4-0000-0000-0000-000000000001/tiny/{alias}")
    name.cfg.resources.ports.append(
        driver_pb2.PortMapping(label="http", value=name.host_port, to=GUEST_PORT)
    )
    reply = drv(name.plugin).StartTask(driver_pb2.StartTaskRequest(task=name.cfg), timeout=120)
    return str(reply.network_override.addr)


def _serves(ns: str, name: Name) -> bool:
    return http_get(ns, f"http://127.0.0.1:{name.host_port}") == name.identity.alias


def test_two_names_serve_bridged_vms_side_by_side_and_stay_apart(
    short_tmp: Path, tiny_guest: Any
) -> None:
    with two_names(short_tmp) as (ns, virt, ch):
        # virt: a block that only turns DHCP on (the tiny guest has no cloud-init), the rest
        # libvirt's default network; ch: a network of its own.
        unset = dict.fromkeys(("bridge", "tap_prefix", "subnet_cidr", "create_bridge"))
        virt_addr = _start_vm(virt, short_tmp, tiny_guest, network_block(**unset, dhcp=True))
        ch_network = network_block(
            **unset | {"subnet_cidr": CH_SUBNET, "create_bridge": True}, dhcp=True
        )
        ch_addr = _start_vm(ch, short_tmp, tiny_guest, ch_network)
        assert virt_addr.startswith("192.168.122.") and ch_addr.startswith("10.77.0."), (
            virt_addr,
            ch_addr,
        )
        for name in (virt, ch):
            assert name.fifo is not None
            assert name.fifo.wait_for(b"dhcp eth0 ", BOOT_TIMEOUT), name.fifo.data[-2000:]
            assert wait_until(lambda name=name: _serves(ns, name), 60), name.identity.alias

        # Each name's TAP is on its own bridge, named with its own prefix.
        virt_ports = links.bridge_ports("virbr0", netns=ns)
        ch_ports = links.bridge_ports(ch.bridge, netns=ns)
        assert [p[:5] for p in virt_ports] == ["nvirt"], virt_ports
        assert [p[:3] for p in ch_ports] == ["nch"], ch_ports
        # Each its own nftables tables, journals and leases.
        tables = _nft_tables(ns)
        for table in ("ip nomad_vm_virt", "ip nomad_vm_ch"):
            assert table in tables, tables
        assert len(virt.journals()) == 1 and len(ch.journals()) == 1
        assert (virt.data_dir / "network-virt" / "leases-virbr0.json").exists()
        assert (ch.data_dir / "network-ch" / f"leases-{ch.bridge}.json").exists()

        # Removing virt's VM leaves ch's serving, and nothing of virt's.
        assert virt.cfg is not None
        stop(virt.plugin, virt.cfg.id, 30)
        wait(virt.plugin, virt.cfg.id, 60)
        drv(virt.plugin).DestroyTask(
            driver_pb2.DestroyTaskRequest(task_id=virt.cfg.id, force=True), timeout=60
        )
        virt.cfg = None
        assert links.bridge_ports("virbr0", netns=ns) == []
        assert virt.journals() == []
        assert _serves(ns, ch)
        assert links.bridge_ports(ch.bridge, netns=ns) == ch_ports
        assert qemu_processes_under(short_tmp / "alloc-virt") == []

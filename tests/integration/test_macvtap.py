"""macvtap NICs through the real plugin process, with real QEMU (TCG), a real veth and DHCP.

Topology (two namespaces the test creates; the host's own namespace only sees the plugin's
gRPC socket, a file)::

    "host" namespace                                 "wire" namespace
    plugin, QEMU ── macvtap nvm... ─┐
                                    nvtmlow ═══veth═══ nvtmwire 10.97.0.1/24, dnsmasq (DHCP)

The plugin runs inside "host" (``ip netns exec``), so the macvtap it makes lives there, in the
namespace of its lower device ``nvtmlow``, which has no address (the guest's traffic never
touches the host's IP stack: that is what a macvtap is). The other end of the wire is the
"wire" namespace: it serves DHCP and is what reaches the guest, the way another machine on the
network would. Running the plugin in a namespace of the test's, rather than in the host's with
``nvtmlow`` there, keeps even an address-less test interface out of the host's own namespace,
and is how every network test here runs the plugin.

The tiny guest (no cloud-init) takes its address by DHCP (``nomadvm.dhcp=1``), prints the lease
on its console and serves HTTP with busybox httpd; the wire side fetches it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from nomad_vm.driver.checkpoints import PAUSE_AT, PAUSE_MARKER
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.network.names import mac_address, tap_name
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import DRIVER, FifoReader, configure, drv, tiny_task
from tests.integration.test_vm_lifecycle import stop, wait, wait_until
from tests.netns import Namespaces, http_get, ip, isolated_namespaces

pytestmark = pytest.mark.integration

LOWER = "nvtmlow"
WIRE = "nvtmwire"
WIRE_IP = "10.97.0.1"
PREFIX = "nvm"  # the plugin's default TAP prefix: the tests configure no bridge network
GUEST_PORT = 8080
BOOT_TIMEOUT = 180
FIELD = "network_interface.macvtap"
_LEASE = re.compile(rb"dhcp eth0 (10\.97\.0\.\d+)/24")


def macvtap_nic(device: str = LOWER, mode: str = "bridge", **extra: object) -> dict[str, object]:
    """``network_interface { macvtap { ... } }`` as Nomad sends it: every attribute present."""
    block: dict[str, object] = {
        "device": device,
        "dns": None,
        "gateway": None,
        "mode": mode,
        "netmask": None,
        "ports": None,
        "static_ip": None,
        **extra,
    }
    return {"bridge": None, "macvtap": block, "vlan": None}


@dataclass
class Wire:
    """The two namespaces, the plugin in "host", dnsmasq in "wire"."""

    spaces: Namespaces
    host: str
    wire: str
    root: Path
    plugins: list[PluginProcess] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @property
    def plugin(self) -> PluginProcess:
        return self.plugins[-1]

    @property
    def journal_dir(self) -> Path:
        return self.root / "data" / "journal"

    def start_plugin(self, env: dict[str, str] | None = None) -> PluginProcess:
        plugin = PluginProcess(["ip", "netns", "exec", self.host, str(DRIVER)], env)
        self.plugins.append(plugin)
        plugin.start(self.root / f"plugin{len(self.plugins)}.stderr")
        return plugin

    def start(self, cfg: driver_pb2.TaskConfig) -> driver_pb2.StartTaskResponse:
        self.started.append(cfg.id)
        reply: driver_pb2.StartTaskResponse = drv(self.plugin).StartTask(
            driver_pb2.StartTaskRequest(task=cfg), timeout=120
        )
        return reply

    def destroy(self, task_id: str) -> None:
        request = driver_pb2.DestroyTaskRequest(task_id=task_id, force=True)
        drv(self.plugin).DestroyTask(request, timeout=60)

    def macvtaps(self) -> dict[str, tuple[str, str, str]]:
        """The macvtap links in "host": name -> (lower device, mode, MAC)."""
        out = subprocess.run(
            ["ip", "-n", self.host, "-d", "-j", "link", "show"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        links = json.loads(out.stdout)
        found = {}
        for link in links:
            info = link.get("linkinfo", {})
            if info.get("info_kind") == "macvtap":
                mode = info.get("info_data", {}).get("mode", "")
                found[link["ifname"]] = (link.get("link", ""), mode, link["address"])
        return found

    def journals(self) -> list[str]:
        return (
            sorted(p.name for p in self.journal_dir.glob("*")) if self.journal_dir.exists() else []
        )

    def assert_clean(self) -> None:
        assert self.macvtaps() == {}
        assert self.journals() == []
        assert not qemu_processes_under(self.root)


@pytest.fixture
def wire(short_tmp: Path) -> Iterator[Wire]:
    with isolated_namespaces((PREFIX, "nvtm")) as spaces:
        host, other = spaces.new(), spaces.new()
        ip("-n", host, "link", "add", LOWER, "type", "veth", "peer", "name", WIRE, "netns", other)
        ip("-n", host, "link", "set", LOWER, "up")
        ip("-n", other, "addr", "add", f"{WIRE_IP}/24", "dev", WIRE)
        ip("-n", other, "link", "set", WIRE, "up")
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", other, "/usr/sbin/dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0", "--user=root",
             f"--interface={WIRE}", "--bind-interfaces", "--pid-file=",
             "--dhcp-range=10.97.0.50,10.97.0.99,255.255.255.0,1h", "--dhcp-authoritative",
             "--dhcp-sequential-ip",
             f"--dhcp-leasefile={short_tmp / 'wire.leases'}",
             f"--log-facility={short_tmp / 'dnsmasq.log'}", "--log-dhcp"],
            text=True,
        )  # fmt: skip
        spaces.procs.append(dnsmasq)  # ended by the namespaces' cleanup, as expected
        net = Wire(spaces, host, other, short_tmp)
        try:
            net.start_plugin()
            yield net
        finally:
            plugin = net.plugins[-1] if net.plugins else None
            if plugin is not None and plugin.process is not None and plugin.process.poll() is None:
                for task_id in net.started:
                    with contextlib.suppress(grpc.RpcError):
                        net.destroy(task_id)
            for plugin in net.plugins:
                plugin.kill()


@contextlib.contextmanager
def served_vm(
    net: Wire, guest: Any, name: str, nic: dict[str, object], run: str = ""
) -> Iterator[tuple[driver_pb2.TaskConfig, FifoReader]]:
    """A tiny guest on ``nic`` that takes a DHCP lease and serves ``name`` over HTTP (in the
    background when it also ``run``s a command)."""
    serve = f"mkdir /www && echo {name} >/www/index.html && httpd -p {GUEST_PORT} -h /www"
    serve = f"{serve} && {run}" if run else serve.replace("httpd ", "httpd -f ")
    with tiny_task(
        net.plugin,
        net.root,
        guest,
        alloc_name=name,
        overrides={
            "network_interface": nic,
            "share_task_dirs": False,
            "cmdline": tiny_cmdline(f"{guest.cmdline} nomadvm.dhcp=1", serve),
        },
    ) as (cfg, fifo, _):
        yield cfg, fifo


def leased_address(fifo: FifoReader) -> str:
    """The address the guest printed once DHCP from the wire side configured it."""
    if not fifo.wait_for(b"dhcp eth0 10.97.0.", BOOT_TIMEOUT):
        raise AssertionError(f"no lease; console:\n{fifo.data.decode(errors='replace')}")
    assert wait_until(lambda: _LEASE.search(fifo.data), 10)
    found = _LEASE.search(fifo.data)
    assert found is not None
    return found.group(1).decode()


def reached_from_the_wire(net: Wire, address: str, body: str) -> bool:
    url = f"http://{address}:{GUEST_PORT}/"
    return wait_until(lambda: http_get(net.wire, url, timeout=3) == body, 60)


@pytest.mark.parametrize("mode", ["bridge", "vepa", "private", "passthrough"])
def test_guest_takes_its_address_from_the_wire_and_is_reached_from_there(
    wire: Wire, tiny_guest: Any, mode: str
) -> None:
    """Each mode: the macvtap exists on the lower device in that mode (journalled as one),
    the guest gets its lease from the other end's DHCP server and answers HTTP there; stop
    and destroy leave no link and no journal."""
    name = f"mv{mode[:4]}"
    with served_vm(wire, tiny_guest, name, macvtap_nic(mode=mode)) as (cfg, fifo):
        reply = wire.start(cfg)
        link = tap_name(PREFIX, cfg.id)
        lower_mac = _mac(wire.host, LOWER)
        guest_mac = lower_mac if mode == "passthrough" else mac_address(cfg.id)
        kernel_mode = "passthru" if mode == "passthrough" else mode
        assert wire.macvtaps() == {link: (LOWER, kernel_mode, guest_mac)}
        assert not reply.HasField("network_override")  # a DHCP address Nomad cannot know
        journal = JournalStore(wire.root / "data").load(cfg.id)
        assert journal is not None and journal.network is not None
        assert (journal.network.kind, journal.network.tap, journal.network.lower) == (
            "macvtap", link, LOWER,
        )  # fmt: skip
        assert journal.network.guest_mac == guest_mac

        address = leased_address(fifo)
        assert guest_mac in (Path(wire.root) / "wire.leases").read_text()
        assert reached_from_the_wire(wire, address, name)

        stop(wire.plugin, cfg.id, 10)
        assert wait(wire.plugin, cfg.id).result.exit_code == 0
        wire.destroy(cfg.id)
    wire.assert_clean()
    assert _mac(wire.host, LOWER) == lower_mac  # passthrough left the device as it was


PROBE_TRIES = 3


def probing_vm(
    net: Wire, guest: Any, name: str, mode: str, target: str
) -> contextlib.AbstractContextManager[tuple[driver_pb2.TaskConfig, FifoReader]]:
    """A tiny guest that pings ``target`` (another guest) PROBE_TRIES times, printing "probe N
    reached" or "probe N failed" for each try (busybox ping: its wget crashes in this guest)."""
    probe = (
        f"for n in $(seq {PROBE_TRIES}); do "
        f'if ping -c 1 -W 3 {target} >/dev/null; then echo "probe $n reached"; '
        'else echo "probe $n failed"; fi; done; sleep 600'
    )
    return served_vm(net, guest, name, macvtap_nic(mode=mode), run=probe)


@pytest.mark.parametrize(("mode", "reaches"), [("bridge", True), ("private", False),
                                               ("vepa", False)])  # fmt: skip
def test_the_mode_decides_whether_guests_on_one_device_reach_each_other(
    wire: Wire, tiny_guest: Any, mode: str, reaches: bool
) -> None:
    """bridge: guests on the same device talk directly; private: never; vepa: only through
    the switch, and the wire side here (a plain veth end) sends nothing back out of the port
    it came from. The wire side reaches both guests in every mode."""
    with contextlib.ExitStack() as stack:
        server, server_fifo = stack.enter_context(
            served_vm(wire, tiny_guest, "mvserver", macvtap_nic(mode=mode))
        )
        wire.start(server)
        address = leased_address(server_fifo)
        assert reached_from_the_wire(wire, address, "mvserver")
        client, client_fifo = stack.enter_context(
            probing_vm(wire, tiny_guest, "mvclient", mode, address)
        )
        wire.start(client)
        assert reached_from_the_wire(wire, leased_address(client_fifo), "mvclient") is True
        last = f"probe {PROBE_TRIES} ".encode()
        assert client_fifo.wait_for(last, BOOT_TIMEOUT), client_fifo.data.decode(errors="replace")
        console = client_fifo.data.decode(errors="replace")
        assert "reached" in console if reaches else "reached" not in console, console
        assert ("failed" in console) is not reaches, console
        for cfg in (client, server):
            wire.destroy(cfg.id)
    wire.assert_clean()


def test_a_restarted_plugin_recovers_the_macvtap_and_destroy_replays_its_journal(
    wire: Wire, tiny_guest: Any
) -> None:
    with served_vm(wire, tiny_guest, "mvrecover", macvtap_nic()) as (cfg, fifo):
        reply = wire.start(cfg)
        address = leased_address(fifo)
        assert reached_from_the_wire(wire, address, "mvrecover")

        first = wire.plugin
        assert first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        link = tap_name(PREFIX, cfg.id)
        assert link in wire.macvtaps()  # the VM and its link outlive the plugin

        second = wire.start_plugin()
        configure(second, wire.root / "data", [str(tiny_guest.vmlinux.parent)])
        stored = driver_pb2.TaskHandle()
        stored.CopyFrom(reply.handle)
        stored.config.CopyFrom(cfg)
        stored.config.msgpack_driver_config = b""  # Nomad does not keep it across restarts
        drv(second).RecoverTask(driver_pb2.RecoverTaskRequest(handle=stored), timeout=30)
        assert reached_from_the_wire(wire, address, "mvrecover")

        wire.destroy(cfg.id)
    wire.assert_clean()


def test_a_fresh_plugin_destroys_what_a_dead_one_left(wire: Wire, tiny_guest: Any) -> None:
    """DestroyTask reaching a plugin that never saw the task: only the journal knows the link."""
    with served_vm(wire, tiny_guest, "mvorphan", macvtap_nic(mode="vepa")) as (cfg, _):
        wire.start(cfg)
        assert tap_name(PREFIX, cfg.id) in wire.macvtaps()
        first = wire.plugin
        assert first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        second = wire.start_plugin()
        configure(second, wire.root / "data", [str(tiny_guest.vmlinux.parent)])
        wire.destroy(cfg.id)
    wire.assert_clean()


@pytest.mark.parametrize("step", ["network", "vmm-spawned", "vmm-recorded"])
def test_a_plugin_killed_mid_start_leaves_nothing_after_a_fresh_plugins_destroy(
    wire: Wire, tiny_guest: Any, step: str
) -> None:
    """SIGKILLed at a StartTask step (before the link, with the link, with QEMU holding its
    descriptor): Nomad got no answer, so a fresh plugin gets only DestroyTask by id, and the
    journal is all that knows the link."""
    marker = wire.root / "paused"
    wire.plugin.kill()
    first = wire.start_plugin({PAUSE_AT: step, PAUSE_MARKER: str(marker)})
    with served_vm(wire, tiny_guest, "mvkilled", macvtap_nic()) as (cfg, _):
        outcome: list[object] = []

        def start() -> None:
            try:
                outcome.append(wire.start(cfg))
            except grpc.RpcError as exc:
                outcome.append(exc)

        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        assert wait_until(marker.exists, 60), outcome
        # Recorded first, created after the "network" step.
        assert (tap_name(PREFIX, cfg.id) in wire.macvtaps()) is (step != "network")
        assert first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        starter.join(30)
        assert isinstance(outcome[0], grpc.RpcError), outcome
        assert wire.journals(), "the dead plugin's journal is gone"

        second = wire.start_plugin()
        configure(second, wire.root / "data", [str(tiny_guest.vmlinux.parent)])
        wire.destroy(cfg.id)
    wire.assert_clean()


def _mac(ns: str, name: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", name],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return str(json.loads(out.stdout)[0]["address"])

"""VM bridge networking through the real plugin process, run inside a throwaway namespace.

Each test starts the plugin with ``ip netns exec nvt-<random>``, so the bridge it creates, the
TAP devices, the guests' traffic and the plugin's nftables table all stay in that namespace (the
"host" below); the gRPC socket is a file and works across namespaces. The ``netns`` module's
fixture deletes the namespaces afterwards and checks that nothing appeared in the host's own.

Port forwarding topology of the Debian test::

    other (10.98.0.2) --veth-- host (10.98.0.1; bridge nvtbr0 10.99.0.1/24) --TAP-- VM 1, VM 2

What a test can see from outside the plugin: the bridge's ports (the TAPs), the lease file
``<data_dir>/network/leases-<bridge>.json``, the rules in table ``ip nomad_vm`` tagged with
``names.rule_tag(task id)``, and the tasks' journals in ``<data_dir>/journal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import grpc
import pytest

from nomad_vm.errors import NetworkError
from nomad_vm.network import links
from nomad_vm.network.names import is_owner_tag, tap_name
from nomad_vm.network.nft import PortForwarder
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import (
    DRIVER,
    FifoReader,
    configure,
    debian_boot,
    drv,
    task_config,
    tiny_task,
)
from tests.integration.test_debian_task import run
from tests.integration.test_vm_lifecycle import stop, wait, wait_until
from tests.netns import Namespaces, http_get, isolated_namespaces, veth

pytestmark = pytest.mark.integration

BRIDGE = "nvtbr0"
TAP_PREFIX = "nvt"
SUBNET = "10.99.0.0/24"
GATEWAY = "10.99.0.1"
HOST_IP = "10.98.0.1"  # the host's address towards the "other machine"
OTHER_IP = "10.98.0.2"
STATIC_FIELD = "network_interface.bridge.static_ip"
PORTS_FIELD = "network_interface.bridge.ports[0]"
GUEST_PORT = 8080


# -- configuration ---------------------------------------------------------------------------


def network_block(**overrides: object) -> dict[str, object]:
    """The plugin's ``network`` block as Nomad sends it: all 10 attributes, unset ones null."""
    block: dict[str, object] = {
        "bridge": BRIDGE,
        "subnet_cidr": SUBNET,
        "gateway": None,
        "ip_pool_start": None,
        "ip_pool_end": None,
        "tap_prefix": TAP_PREFIX,
        "create_bridge": True,
        "nat": False,
        "dhcp": False,
        "dnsmasq_binary": None,
        **overrides,
    }
    assert len(block) == 10, block
    return dict(sorted(block.items()))


def bridge_nic(
    ports: tuple[str, ...] = (), static_ip: str | None = None, name: str | None = BRIDGE
) -> dict[str, object]:
    """A task's ``network_interface { bridge { ... } }``, every attribute present (``name``
    None: the plugin's bridge)."""
    bridge = {
        "dns": None,
        "gateway": None,
        "name": name,
        "netmask": None,
        "ports": list(ports),
        "static_ip": static_ip,
    }
    return {"bridge": bridge, "vlan": None}


def tiny_overrides(nic: dict[str, object]) -> dict[str, object]:
    """Task options for a tiny guest with this NIC. No shares: the tiny guest mounts nothing,
    and a virtiofsd per task is one more process that has nothing to do with networking."""
    return {"network_interface": nic, "share_task_dirs": False}


def forward(cfg: driver_pb2.TaskConfig, label: str, host_port: int, to: int = 0) -> None:
    """A port Nomad allocated for the group (``network { port "label" { to = ... } }``)."""
    cfg.resources.ports.append(driver_pb2.PortMapping(label=label, value=host_port, to=to))


# -- the host: a namespace with the plugin inside ----------------------------------------------


@dataclass
class NetHost:
    """The test's "host": a namespace, the plugin running in it, and what the test can observe
    there. Tasks started through ``start`` are destroyed at teardown if a test left them."""

    spaces: Namespaces
    ns: str
    root: Path
    plugin: PluginProcess | None = None
    plugins: list[PluginProcess] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def network_dir(self) -> Path:
        return self.data_dir / "network"

    @property
    def lease_file(self) -> Path:
        return self.network_dir / f"leases-{BRIDGE}.json"

    @property
    def nft(self) -> PortForwarder:
        return PortForwarder(netns=self.ns)

    def start_plugin(self, env: dict[str, str] | None = None) -> PluginProcess:
        plugin = PluginProcess(["ip", "netns", "exec", self.ns, str(DRIVER)], env)
        self.plugins.append(plugin)
        plugin.start(self.root / f"plugin{len(self.plugins)}.stderr")
        self.plugin = plugin
        return plugin

    def configure(self, image_paths: list[str], **network: object) -> None:
        assert self.plugin is not None
        configure(self.plugin, self.data_dir, image_paths, network=network_block(**network))

    # -- tasks

    def start(self, cfg: driver_pb2.TaskConfig) -> driver_pb2.StartTaskResponse:
        assert self.plugin is not None
        self.started.append(cfg.id)
        reply: driver_pb2.StartTaskResponse = drv(self.plugin).StartTask(
            driver_pb2.StartTaskRequest(task=cfg), timeout=120
        )
        return reply

    def start_in_background(
        self, cfg: driver_pb2.TaskConfig
    ) -> tuple[threading.Thread, list[object]]:
        """StartTask in a thread (the test kills the plugin meanwhile); the list receives its
        reply or its RpcError."""
        outcome: list[object] = []

        def start() -> None:
            try:
                outcome.append(self.start(cfg))
            except grpc.RpcError as exc:
                outcome.append(exc)

        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        return starter, outcome

    def start_fails(self, cfg: driver_pb2.TaskConfig) -> grpc.RpcError:
        """StartTask's error, after checking that the failed start created nothing."""
        before = self.observe()
        with pytest.raises(grpc.RpcError) as err:
            self.start(cfg)
        assert self.observe() == before
        assert not self.nft.rules(cfg.id)
        assert not qemu_processes_under(Path(cfg.alloc_dir))
        return err.value

    def destroy(self, task_id: str) -> None:
        assert self.plugin is not None
        request = driver_pb2.DestroyTaskRequest(task_id=task_id, force=True)
        drv(self.plugin).DestroyTask(request, timeout=60)

    # -- what the host shows

    def taps(self) -> list[str]:
        """The bridge's ports; none while the bridge does not exist."""
        try:
            return links.bridge_ports(BRIDGE, netns=self.ns)
        except NetworkError:
            if not links.link_exists(BRIDGE, netns=self.ns):
                return []
            # The plugin made the bridge between the two looks.
            return links.bridge_ports(BRIDGE, netns=self.ns)

    def leases(self) -> dict[str, str]:
        if not self.lease_file.exists():
            return {}
        data = json.loads(self.lease_file.read_text())
        return dict(data["leases"])

    def leased(self) -> list[str]:
        return sorted(self.leases().values())

    def owner_tags(self) -> set[str]:
        """The tags of per-task rules in the table (the bridge's own rules aside)."""
        return {r.comment for r in self.nft.rules() if r.comment and is_owner_tag(r.comment)}

    def records(self) -> list[str]:
        """The plugin's records of tasks: their journals, and any file under
        ``<data_dir>/network`` other than the lease file and its lock."""
        lease = self.lease_file.name
        network = [
            p
            for p in self.network_dir.rglob("*")
            if p.is_file() and p.name not in (lease, f"{lease}.lock")
        ]
        journals = list((self.data_dir / "journal").glob("*"))
        return sorted(str(p.relative_to(self.data_dir)) for p in network + journals)

    def observe(self) -> tuple[list[str], dict[str, str], set[str], list[str]]:
        return self.taps(), self.leases(), self.owner_tags(), self.records()

    def assert_clean(self) -> None:
        """No TAP on the bridge, no lease, no rule for any task, no record of one."""
        assert self.observe() == ([], {}, set(), [])

    def teardown(self) -> None:
        """Destroy what a failed test left (through the live plugin), then end the plugins."""
        live = self.plugin is not None and self.plugin.process is not None
        if live and self.plugin.process.poll() is None:  # type: ignore[union-attr]
            for task_id in self.started:
                with contextlib.suppress(grpc.RpcError):
                    self.destroy(task_id)
        for plugin in self.plugins:
            plugin.kill()


@pytest.fixture
def host(short_tmp: Path) -> Iterator[NetHost]:
    """A fresh namespace with the plugin running in it (started, not yet configured)."""
    with isolated_namespaces((BRIDGE, TAP_PREFIX)) as spaces:
        net = NetHost(spaces, spaces.new(), short_tmp)
        try:
            net.start_plugin()
            yield net
        finally:
            net.teardown()


def expect_invalid(err: grpc.RpcError, field_name: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert field_name in (err.details() or ""), err.details()


@dataclass
class TinyVMs:
    """Builds tiny-guest tasks with a NIC on the bridge (the tiny guest ignores the address:
    these tests only look at the host side)."""

    net: NetHost
    guest: Any
    stack: contextlib.ExitStack
    network: dict[str, object]

    def task(
        self,
        name: str,
        static_ip: str | None = None,
        ports: tuple[str, ...] = (),
        forwards: dict[str, int] | None = None,
    ) -> driver_pb2.TaskConfig:
        assert self.net.plugin is not None
        cfg, _, _ = self.stack.enter_context(
            tiny_task(
                self.net.plugin,
                self.net.root,
                self.guest,
                alloc_name=name,
                overrides=tiny_overrides(bridge_nic(ports, static_ip)),
                plugin_options={"network": self.network},
            )
        )
        for label, host_port in (forwards or {}).items():
            forward(cfg, label, host_port, GUEST_PORT)
        return cfg


@contextlib.contextmanager
def tiny_vms(net: NetHost, guest: Any, **network: object) -> Iterator[TinyVMs]:
    with contextlib.ExitStack() as stack:
        yield TinyVMs(net, guest, stack, network_block(**network))


# -- 1. two Debian guests ------------------------------------------------------------------


@dataclass
class DebianVM:
    n: int
    cfg: driver_pb2.TaskConfig
    fifo: FifoReader
    host_port: int
    addr: str = ""


def debian_vm(root: Path, guest: Any, n: int) -> DebianVM:
    """VM ``n``: a Debian task serving ``vm-<n>`` over HTTP on GUEST_PORT, forwarded from
    host port 20079+n."""
    alloc = root / f"deb{n}"
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    serve = (
        f"mkdir -p /srv/www && echo vm-{n} > /srv/www/index.html && "
        f"setsid nohup python3 -m http.server {GUEST_PORT} --directory /srv/www "
        ">/dev/null 2>&1 &"
    )
    config = {
        **debian_boot(guest),
        "hostname": f"vm-{n}",
        "share_task_dirs": False,
        "cmds": [serve, f"echo READY-{n} > /dev/ttyS0"],
        "network_interface": bridge_nic(("http",)),
    }
    cfg = task_config(alloc, config, task_id=f"alloc/tiny/deb{n}")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    vm = DebianVM(n, cfg, fifo, host_port=20079 + n)
    forward(cfg, "http", vm.host_port, GUEST_PORT)
    return vm


def guest_get(plugin: PluginProcess, vm: DebianVM, url: str) -> str:
    """What ``vm`` fetches from ``url`` (through the guest agent)."""
    script = (
        "import urllib.request; "
        f"print(urllib.request.urlopen({url!r}, timeout=10).read().decode().strip())"
    )
    out, code = run(plugin, vm.cfg.id, f'python3 -c "{script}"')
    return out.decode().strip() if code == 0 else f"exit {code}: {out.decode()}"


def guest_network(plugin: PluginProcess, vm: DebianVM) -> str:
    """The guest's addresses and routes, for failure messages."""
    out, _ = run(plugin, vm.cfg.id, "ip -4 -br addr; ip -4 route")
    return out.decode()


def wait_until_serving(plugin: PluginProcess, vm: DebianVM, events: list[tuple[str, str]]) -> None:
    """The agent answers, cloud-init ran the cmds, and the server answers inside the guest."""

    def answered() -> bool:
        return any(task == vm.cfg.id and "Guest agent answered" in m for task, m in events)

    def serving() -> bool:
        return guest_get(plugin, vm, f"http://127.0.0.1:{GUEST_PORT}") == f"vm-{vm.n}"

    assert wait_until(answered, 300), events
    assert vm.fifo.wait_for(f"READY-{vm.n}".encode(), 300), bytes(vm.fifo.data[-3000:])
    assert wait_until(serving, 60), guest_get(plugin, vm, f"http://127.0.0.1:{GUEST_PORT}")


def collect_task_events(plugin: PluginProcess) -> tuple[grpc.Future, list[tuple[str, str]]]:
    """A TaskEvents stream whose (task id, message) pairs accumulate in the returned list."""
    stream = drv(plugin).TaskEvents(driver_pb2.TaskEventsRequest())
    seen: list[tuple[str, str]] = []

    def pump() -> None:
        with contextlib.suppress(grpc.RpcError):
            for event in stream:
                seen.append((event.task_id, event.message))

    threading.Thread(target=pump, daemon=True).start()
    return stream, seen


def test_two_vms_get_pool_addresses_reach_each_other_and_serve_through_forwarded_ports(
    host: NetHost,
    debian_guest: Any,
) -> None:
    other = host.spaces.new()
    veth(host.ns, "nvtvo", f"{HOST_IP}/24", other, "eth0", f"{OTHER_IP}/24")
    host.configure(
        [str(debian_guest.disk.parent)], ip_pool_start="10.99.0.10", ip_pool_end="10.99.0.200"
    )
    assert host.plugin is not None
    plugin = host.plugin
    stream, events = collect_task_events(plugin)
    vms = [debian_vm(host.root, debian_guest, n) for n in (1, 2)]
    try:
        # Both boot at once: a Debian boot under TCG takes minutes.
        for vm in vms:
            override = host.start(vm.cfg).network_override
            vm.addr = override.addr
            assert IPv4Address("10.99.0.10") <= IPv4Address(vm.addr) <= IPv4Address("10.99.0.200")
            assert dict(override.port_map) == {"http": GUEST_PORT}
            assert override.auto_advertise
        assert vms[0].addr != vms[1].addr
        assert host.leased() == sorted(vm.addr for vm in vms)
        assert host.taps() == sorted(tap_name(TAP_PREFIX, vm.cfg.id) for vm in vms)
        for vm in vms:
            assert host.nft.rules(vm.cfg.id), f"no port forward rules for {vm.cfg.id}"

        for vm in vms:
            wait_until_serving(plugin, vm, events)

        vm1, vm2 = vms
        # Every path at once, so that a failure shows which of them work.
        paths = {
            # VM to VM across the bridge, by the addresses the plugin reported.
            "vm1 -> vm2": (guest_get(plugin, vm1, f"http://{vm2.addr}:{GUEST_PORT}"), "vm-2"),
            "vm2 -> vm1": (guest_get(plugin, vm2, f"http://{vm1.addr}:{GUEST_PORT}"), "vm-1"),
            # The host itself: localhost and its own addresses.
            "host -> localhost": (http_get(host.ns, f"http://127.0.0.1:{vm1.host_port}"), "vm-1"),
            "host -> own address": (
                http_get(host.ns, f"http://{HOST_IP}:{vm1.host_port}"),
                "vm-1",
            ),
            "host -> bridge address": (
                http_get(host.ns, f"http://{GATEWAY}:{vm2.host_port}"),
                "vm-2",
            ),
            # Another machine, through the host's address.
            "other -> host (vm2)": (http_get(other, f"http://{HOST_IP}:{vm2.host_port}"), "vm-2"),
            "other -> host (vm1)": (http_get(other, f"http://{HOST_IP}:{vm1.host_port}"), "vm-1"),
        }
        failed = {path: got for path, (got, want) in paths.items() if got != want}
        assert not failed, (failed, {vm.addr: guest_network(plugin, vm) for vm in vms})

        for vm in vms:
            stop(plugin, vm.cfg.id, 30)
            wait(plugin, vm.cfg.id)
            host.destroy(vm.cfg.id)
    finally:
        stream.cancel()
        for vm in vms:
            vm.fifo.close()
    host.assert_clean()
    assert http_get(other, f"http://{HOST_IP}:{vms[1].host_port}", timeout=2).startswith("error")


# -- 2. static addresses -------------------------------------------------------------------


def test_static_ip_is_used_and_bad_static_ips_fail_before_anything_is_created(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    with tiny_vms(host, tiny_guest) as vms:
        web = vms.task("web", static_ip="10.99.0.5", ports=("http",), forwards={"http": 20080})
        override = host.start(web).network_override
        assert override.addr == "10.99.0.5"
        assert dict(override.port_map) == {"http": GUEST_PORT}
        assert host.leased() == ["10.99.0.5"]
        assert host.taps() == [tap_name(TAP_PREFIX, web.id)]
        assert host.nft.rules(web.id), "no port forward rules for the task"
        assert host.owner_tags() == {r.comment for r in host.nft.rules(web.id)}

        for name, static_ip in (("twin", "10.99.0.5"), ("outside", "10.50.0.5"), ("gw", GATEWAY)):
            cfg = vms.task(name, static_ip=static_ip, ports=("http",), forwards={"http": 20081})
            expect_invalid(host.start_fails(cfg), STATIC_FIELD)

        host.destroy(web.id)
        host.assert_clean()
        # The address is free again.
        again = vms.task("again", static_ip="10.99.0.5")
        assert host.start(again).network_override.addr == "10.99.0.5"
        host.destroy(again.id)
        host.destroy(again.id)  # idempotent
    host.assert_clean()


# -- 3. pool exhaustion ----------------------------------------------------------------------


def test_pool_exhaustion_then_release_and_reuse(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    with tiny_vms(host, tiny_guest, ip_pool_start="10.99.0.10", ip_pool_end="10.99.0.11") as vms:
        first, second = vms.task("first"), vms.task("second")
        assert host.start(first).network_override.addr == "10.99.0.10"
        assert host.start(second).network_override.addr == "10.99.0.11"

        err = host.start_fails(vms.task("third"))
        details = err.details() or ""
        assert "10.99.0.10-10.99.0.11" in details, (err.code(), details)

        host.destroy(first.id)
        assert host.leased() == ["10.99.0.11"]
        assert host.taps() == [tap_name(TAP_PREFIX, second.id)]
        fourth = vms.task("fourth")
        assert host.start(fourth).network_override.addr == "10.99.0.10"
        assert host.leased() == ["10.99.0.10", "10.99.0.11"]
        host.destroy(second.id)
        host.destroy(fourth.id)
    host.assert_clean()


# -- 4. the plugin dies mid-start ----------------------------------------------------------

FAKE_QEMU = """#!/usr/bin/python3
# Stands in for QEMU: answers --version, otherwise never opens its QMP socket.
import sys, time
if "--version" in sys.argv:
    print("QEMU emulator version 7.2.0")
    sys.exit(0)
time.sleep(600)
"""


def test_plugin_killed_while_qemu_starts_leaves_nothing_after_destroy(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    """The plugin is SIGKILLed while StartTask waits for QMP (TAP, lease, forwards and QEMU
    all exist); Nomad never got an answer, so a fresh plugin only gets DestroyTask with the
    task id. The driver must end the orphaned QEMU (it outlives the plugin in its own session)
    and remove everything else. See test_crash_safety.py for every other step."""
    fake = host.root / "qemu-system-fake"
    fake.write_text(FAKE_QEMU)
    fake.chmod(0o755)
    network = network_block()
    options: dict[str, object] = {"network": network, "qemu_binary": str(fake)}
    with tiny_task(
        host.plugin,  # type: ignore[arg-type]
        host.root,
        tiny_guest,
        alloc_name="killed",
        overrides=tiny_overrides(bridge_nic(("http",))),
        plugin_options=options,
    ) as (cfg, _, _):
        forward(cfg, "http", 20080, GUEST_PORT)
        tap = tap_name(TAP_PREFIX, cfg.id)
        starter, outcome = host.start_in_background(cfg)
        # TAP, then port forwards, then QEMU; the plugin then waits up to 30 s for QMP, which
        # the fake never opens. Kill it there: everything of the network exists by then.
        assert wait_until(lambda: tap in host.taps(), 25), (outcome, host.observe())
        assert wait_until(lambda: fake_qemu_running(host.root), 10), outcome
        assert host.leased(), "no address leased"
        assert host.nft.rules(cfg.id), "no port forward rules"
        assert host.records(), "no record of the task's state"

        first = host.plugin
        assert first is not None and first.process is not None
        first.process.kill()  # SIGKILL, while StartTask waits for QMP
        assert first.wait_exit(10) is not None
        starter.join(30)
        assert isinstance(outcome[0], grpc.RpcError), outcome

        # Still there: the plugin died before it could undo anything.
        assert tap in host.taps() and fake_qemu_running(host.root)
        second = host.start_plugin()
        configure(second, host.data_dir, [str(tiny_guest.vmlinux.parent)], **options)
        host.destroy(cfg.id)
        assert not qemu_processes_under(host.root), "the orphaned QEMU was not ended"
        host.assert_clean()  # also: no journal, nothing in <data_dir>/network but the leases
        assert not host.nft.rules(cfg.id)
        # Idempotent, and fine for a task nobody ever heard of.
        host.destroy(cfg.id)
        host.destroy("a1b2c3d4-0000-0000-0000-000000000001/tiny/never-started")
        host.assert_clean()


def fake_qemu_running(root: Path) -> bool:
    """The stand-in QEMU runs its program (not just the gate it is forked at)."""
    return any(
        "qemu-system-fake" in " ".join(p.cmdline()) and "python" in p.cmdline()[0]
        for p in qemu_processes_under(root)
    )


# -- 5. validation ---------------------------------------------------------------------------


def test_unknown_port_label_is_a_validation_error(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    with tiny_vms(host, tiny_guest) as vms:
        cfg = vms.task("noport", ports=("nope",), forwards={"http": 20080})
        expect_invalid(host.start_fails(cfg), PORTS_FIELD)
    host.assert_clean()
    assert host.leases() == {}


# -- 6. many cycles --------------------------------------------------------------------------

CYCLES = int(os.environ.get("NOMAD_VM_NETWORK_CYCLES", "100"))


def test_many_start_stop_cycles_leave_table_bridge_and_pool_as_they_began(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    """Each cycle starts a VM with a forwarded port, stops it gracefully (WaitTask) and destroys
    it; afterwards the table, the bridge's ports and the pool file are what they were."""
    host.configure([str(tiny_guest.vmlinux.parent)])
    assert host.plugin is not None

    def cycle(i: int) -> None:
        with tiny_vms(host, tiny_guest) as vms:
            cfg = vms.task(f"c{i}", ports=("http",), forwards={"http": 21000 + i % 50})
            host.start(cfg)
            assert host.nft.rules(cfg.id) and len(host.taps()) == 1
            stop(host.plugin, cfg.id, 0)  # type: ignore[arg-type]
            wait(host.plugin, cfg.id)  # type: ignore[arg-type]
            host.destroy(cfg.id)

    def table() -> list[tuple[str, str | None, str]]:
        # Handles change when the bridge's own rules are re-declared; what they do must not.
        return sorted((r.chain, r.comment, json.dumps(r.expr)) for r in host.nft.rules())

    cycle(0)  # the first start creates the bridge, its rules and the pool file
    before = (table(), host.taps(), host.lease_file.read_text())
    for i in range(1, CYCLES + 1):
        cycle(i)
    assert (table(), host.taps(), host.lease_file.read_text()) == before
    host.assert_clean()


# -- 7. recovery ---------------------------------------------------------------------------


def test_recovered_task_gets_its_lease_back_and_stale_leases_go(
    host: NetHost,
    tiny_guest: Any,
) -> None:
    """A plugin restart with the lease file damaged meanwhile: RecoverTask restores the
    running task's lease (so the address cannot be handed out twice) and drops a lease no
    task record backs; the task's network is still torn down completely afterwards."""
    with tiny_vms(host, tiny_guest) as vms:
        cfg = vms.task("recovered", ports=("http",), forwards={"http": 20080})
        reply = host.start(cfg)
        address = reply.network_override.addr
        assert host.leased() == [address]

        first = host.plugin
        assert first is not None and first.process is not None
        first.process.kill()
        assert first.wait_exit(10) is not None
        data = json.loads(host.lease_file.read_text())
        data["leases"] = {"a-task-that-is-gone": "10.99.0.77"}
        host.lease_file.write_text(json.dumps(data))

        second = host.start_plugin()
        host.configure([str(tiny_guest.vmlinux.parent)])
        stored = driver_pb2.TaskHandle()
        stored.CopyFrom(reply.handle)
        stored.config.CopyFrom(cfg)
        stored.config.msgpack_driver_config = b""  # Nomad does not keep it across restarts
        drv(second).RecoverTask(driver_pb2.RecoverTaskRequest(handle=stored), timeout=30)
        assert host.leases() == {cfg.id: address}
        assert tap_name(TAP_PREFIX, cfg.id) in host.taps() and host.nft.rules(cfg.id)
        host.destroy(cfg.id)
    host.assert_clean()

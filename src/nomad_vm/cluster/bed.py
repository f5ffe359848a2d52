"""The cluster bed: namespaces, links, one Nomad server and N clients, and its teardown.

Topology (``<id>`` is random per bed, so beds and other tests can run side by side)::

    netns nvk-<id>-core: server 10.77.0.1/24 on bridge core0
        |-- veth to-c1 ---- netns nvk-<id>-c1: eth0 10.77.0.11/24, client-1 and its plugin,
        |                    the plugin's bridge vmbr0 (10.78.1.0/24, DHCP) and its VMs' TAPs
        |-- veth to-c2 ---- netns nvk-<id>-c2: eth0 10.77.0.12/24, client-2 ... (10.78.2.0/24)
        ...

Every address, link, nftables table and listening socket exists only in these namespaces; the
host's own namespace sees the namespace files, the processes and the bed's directory. The
bed's state (namespaces, directory) is in ``bed.json`` there, so another process (`make
cluster-stop`) can tear it down: every process inside the namespaces is killed, the plugin
task cgroups they ran in removed, the namespaces (and with them their links) deleted, and the
directory removed (after unmounting what Nomad mounted in it).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from nomad_vm.cli.devagent import remove_tree
from nomad_vm.cluster.agents import ClusterAgent, ClusterAgentConfig
from nomad_vm.vm.cgroups import CGROUP_ROOT

PREFIX = "nvk"
CORE_BRIDGE = "core0"
SERVER_ADDRESS = "10.77.0.1"
PLUGIN_BRIDGE = "vmbr0"
TAP_PREFIX = "vmtap"
STATE_FILE = "bed.json"


def client_address(index: int) -> str:
    return f"10.77.0.{10 + index}"


def client_subnet(index: int) -> str:
    return f"10.78.{index}.0/24"


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class BedConfig:
    workdir: Path
    nomad_binary: Path
    driver_executable: Path
    image_paths: Sequence[Path]
    clients: int = 3
    log_level: str = "DEBUG"


class ClusterBed:
    def __init__(self, config: BedConfig) -> None:
        self.config = config
        self.id = secrets.token_hex(3)
        self.core = f"{PREFIX}-{self.id}-core"
        self.server = self._agent("server", self.core, SERVER_ADDRESS, None)
        self.clients = [
            self._agent(
                f"client-{i}", f"{PREFIX}-{self.id}-c{i}", client_address(i), SERVER_ADDRESS, i
            )
            for i in range(1, config.clients + 1)
        ]

    @property
    def namespaces(self) -> list[str]:
        return [self.core, *(c.config.netns or "" for c in self.clients)]

    def _agent(
        self, name: str, netns: str, bind: str, server: str | None, index: int = 0
    ) -> ClusterAgent:
        cfg = self.config
        return ClusterAgent(
            ClusterAgentConfig(
                workdir=cfg.workdir / name,
                nomad_binary=cfg.nomad_binary,
                driver_executable=cfg.driver_executable,
                image_paths=cfg.image_paths,
                log_level=cfg.log_level,
                dev=False,
                http_port=4646,
                rpc_port=4647,
                serf_port=4648,
                netns=netns,
                plugin_network={
                    "bridge": PLUGIN_BRIDGE,
                    "subnet_cidr": client_subnet(index),
                    "create_bridge": True,
                    "tap_prefix": TAP_PREFIX,
                    "dhcp": True,
                },
                name=name,
                bind=bind,
                server=server,
            )
        )

    def start(self, timeout: float = 120.0) -> None:
        """Namespaces, links, agents; returns once every client is ready with a healthy vm
        driver. On failure, everything made so far is torn down."""
        self.config.workdir.mkdir(mode=0o711, parents=True, exist_ok=True)
        (self.config.workdir / STATE_FILE).write_text(
            json.dumps({"namespaces": self.namespaces, "workdir": str(self.config.workdir)})
        )
        try:
            self._make_network()
            self.server.start()
            for client in self.clients:
                client.start()
            self.wait_ready(timeout)
        except BaseException:
            self.teardown()
            raise

    def _make_network(self) -> None:
        for ns in self.namespaces:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.core, "link", "add", CORE_BRIDGE, "type", "bridge")
        ip("-n", self.core, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", CORE_BRIDGE)
        ip("-n", self.core, "link", "set", CORE_BRIDGE, "up")
        for i, client in enumerate(self.clients, start=1):
            ns, port = client.config.netns or "", f"to-c{i}"
            ip("-n", self.core, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)  # fmt: skip
            ip("-n", self.core, "link", "set", port, "master", CORE_BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{client_address(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def nodes(self) -> dict[str, dict[str, object]]:
        """The server's node list, by node name."""
        found = self.server.api("/v1/nodes")
        assert isinstance(found, list)
        return {str(n["Name"]): n for n in found}

    def client_ready(self, name: str) -> bool:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            node = self.nodes()[name]
            if node["Status"] != "ready":
                return False
            full = self.server.api(f"/v1/node/{node['ID']}")
            assert isinstance(full, dict)
            vm = (full.get("Drivers") or {}).get("vm") or {}
            return bool(vm.get("Detected") and vm.get("Healthy"))
        return False

    def wait_ready(self, timeout: float = 120.0, names: Sequence[str] | None = None) -> None:
        wanted = list(names or [c.config.name for c in self.clients])
        deadline = time.monotonic() + timeout
        while True:
            for agent in (self.server, *self.clients):
                if agent.process is not None and agent.process.poll() is not None:
                    raise RuntimeError(f"{agent.config.name} exited; see {agent.log_path}")
            missing = [n for n in wanted if not self.client_ready(n)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"clients not ready after {timeout:.0f}s: {missing}")
            time.sleep(0.5)

    def start_relay(self, port: int) -> int:
        """Relay 127.0.0.1:``port`` on the host to the server's HTTP API (its UI) in the core
        namespace (``nomad_vm.cluster.relay``); recorded in the state file for teardown."""
        relay = subprocess.Popen(
            [sys.executable, "-m", "nomad_vm.cluster.relay", self.core, str(port),
             SERVER_ADDRESS, str(self.server.config.http_port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        state_file = self.config.workdir / STATE_FILE
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "relay_pid": relay.pid}))
        return relay.pid

    def client(self, name: str) -> ClusterAgent:
        (found,) = [c for c in self.clients if c.config.name == name]
        return found

    def teardown(self) -> None:
        teardown(self.config.workdir)


def teardown(workdir: Path) -> list[str]:
    """Remove a bed by its directory's state file (see the module doc); returns the names of
    the namespaces it deleted. Safe to call twice."""
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
    except FileNotFoundError:
        return []
    namespaces = [str(n) for n in state["namespaces"]]
    _stop_relay(state.get("relay_pid"), namespaces[0])
    procs = [p for ns in namespaces for p in processes_in(ns)]
    cgroups = {c for p in procs for c in _task_cgroups_of(p.pid)}
    # Agents first, so that none launches a plugin again while the rest is killed.
    for proc in sorted(procs, key=lambda p: "nomad" not in p.name()):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=15)
    for ns in namespaces:  # a process started in between (a plugin's helper) goes too
        for proc in processes_in(ns):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                proc.wait(10)
    for cgroup in sorted(cgroups, reverse=True):
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    deleted = []
    for ns in namespaces:
        if (Path("/run/netns") / ns).exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            deleted.append(ns)
    remove_tree(workdir)
    return deleted


def _stop_relay(pid: object, core: str) -> None:
    """The relay is in the host's namespace: found by its pid, checked by its command line."""
    if not isinstance(pid, int):
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        if "nomad_vm.cluster.relay" in cmdline and core in cmdline:
            proc.kill()
            proc.wait(10)


def processes_in(netns: str) -> list[psutil.Process]:
    """Every process in network namespace ``netns`` (`ip netns pids`)."""
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30, check=False
    )
    found = []
    for pid in out.stdout.split():
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(int(pid)))
    return found


def _task_cgroups_of(pid: int) -> list[Path]:
    """The plugin's task cgroups (``nomad-vm/<hash>``) process ``pid`` runs in."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if not path.startswith("/nomad-vm/"):
                continue
            # v1: one hierarchy per controller (name=systemd is mounted as "systemd");
            # v2: the single tree, at the root.
            for root in controllers.split(",") if controllers else [""]:
                found.append(CGROUP_ROOT / root.removeprefix("name=") / path.lstrip("/"))
    return found

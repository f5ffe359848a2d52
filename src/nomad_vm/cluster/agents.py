"""The cluster bed's Nomad agents: a server, and clients that each load their own plugin.

Every agent runs inside its namespace (``DevAgent``'s ``netns``) and binds only its address on
the bed's core link, so ports are the same fixed ones on every agent without clashing with
anything else on the machine.

Failure detection is tuned for a test bed (docs/cluster.md): a client that stops heartbeating
is marked down, and its allocations lost and replaced, after ``min_heartbeat_ttl`` +
``heartbeat_grace`` (~8 s instead of Nomad's ~20-30 s). Not lower: on a busy 2-core machine
running VMs under TCG a live client's heartbeat can be late by a few seconds, and a healthy
client marked down makes the scheduler replace VMs that are fine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import psutil

from nomad_vm.cli.devagent import DevAgent, DevAgentConfig
from nomad_vm.cli.hcl import hcl_string

HTTP_PORT, RPC_PORT, SERF_PORT = 4646, 4647, 4648
MIN_HEARTBEAT_TTL = "4s"
HEARTBEAT_GRACE = "4s"


@dataclass
class ClusterAgentConfig(DevAgentConfig):
    """A DevAgentConfig for one agent of the bed: ``name`` (the node's name), ``bind`` (its
    address on the core link), ``server`` (the server's address; None: this is the server),
    ``interface`` (the client's link towards the server, whose address Nomad fingerprints)."""

    name: str = ""
    bind: str = "127.0.0.1"
    server: str | None = None
    interface: str = "eth0"

    def render(self) -> str:
        head = f"""
name      = {hcl_string(self.name)}
bind_addr = {hcl_string(self.bind)}
log_level = {hcl_string(self.log_level)}
ports {{
  http = {self.http_port}
  rpc  = {self.rpc_port}
  serf = {self.serf_port}
}}
disable_update_check = true
telemetry {{
  publish_allocation_metrics = true
}}
"""
        if self.server is None:
            return (
                head
                + f"""
server {{
  enabled           = true
  bootstrap_expect  = 1
  min_heartbeat_ttl = {hcl_string(MIN_HEARTBEAT_TTL)}
  heartbeat_grace   = {hcl_string(HEARTBEAT_GRACE)}
  # Spread, not bin-pack: a new allocation goes to the emptiest client.
  default_scheduler_config {{
    scheduler_algorithm = "spread"
  }}
}}
"""
            )
        return (
            head
            + f"""
client {{
  enabled           = true
  servers           = [{hcl_string(f"{self.server}:{self.rpc_port}")}]
  network_interface = {hcl_string(self.interface)}
  options = {{
    "fingerprint.denylist" = "{self.fingerprint_denylist}"
    # Only our driver: the others' fingerprinting (docker polls its socket) costs CPU.
    "driver.allowlist" = "vm"
  }}
}}
{self.plugin_block()}"""
        )


class ClusterAgent(DevAgent):
    """A DevAgent reached on its bed address (from inside its namespace), that can also be
    killed the hard way."""

    config: ClusterAgentConfig

    def __init__(self, config: ClusterAgentConfig) -> None:
        super().__init__(config)
        self.config = config

    @property
    def address(self) -> str:
        return f"http://{self.config.bind}:{self.config.http_port}"

    @property
    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    def plugin_pids(self) -> list[int]:
        """The agent's plugin processes (what Nomad launched from its plugin_dir)."""
        if self.pid is None:
            return []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.pid).children(recursive=True)
            return [
                p.pid for p in children if any("nomad-driver-vm" in part for part in _cmdline(p))
            ]
        return []

    def plugin_serving(self) -> tuple[int, int] | None:
        """Which plugin process serves Nomad's fingerprints: its control socket (made anew,
        at the first fingerprint, by every plugin process) by inode and creation time."""
        try:
            info = (self.config.workdir / "plugin-data" / "control" / "control.sock").stat()
        except OSError:
            return None
        return info.st_ino, info.st_ctime_ns

    def kill_plugins(self) -> list[int]:
        """SIGKILL the plugins only: Nomad launches them again and recovers their tasks."""
        pids = self.plugin_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def kill(self) -> None:
        """SIGKILL the agent and its plugins at once, as a crash of the whole client would:
        the VMs (in sessions of their own) keep running, unknown to anyone."""
        plugins = self.plugin_pids()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in plugins:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        psutil.wait_procs([p for p in map(_process, plugins) if p is not None], timeout=10)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None

"""A real Nomad dev agent (loopback only) with nomad-driver-vm in its plugin_dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nomad_vm.cli.devagent import DevAgent, DevAgentConfig, free_port
from nomad_vm.cli.paths import nomad_binary, tool_binary
from tests.conftest import REPO, task_state_in, vm_processes_under, wait_until
from tests.netns import isolated_namespaces


@contextlib.contextmanager
def running_agent(
    image_paths: list[Path],
    *,
    dev: bool = True,
    netns: str | None = None,
    plugin_network: Mapping[str, object] | None = None,
    consul_address: str | None = None,
    cni_path: Path | None = None,
    plugin_extra: Mapping[str, object] | None = None,
    drop_ins: Mapping[str, str | None] | None = None,
    extra_configs: Sequence[Path] = (),
    host_volumes: Mapping[str, Path] | None = None,
    acl: bool = False,
    raw_exec: bool = False,
) -> Iterator[DevAgent]:
    """A Nomad agent with our plugin, on loopback; everything it started is gone afterwards.

    With ``netns`` the agent runs in that network namespace (see ``private_netns``), and
    ``plugin_network`` becomes the plugin's ``network { ... }`` block. With ``consul_address``
    (see ``running_consul``) the agent registers services with that Consul agent. ``cni_path``
    is the client's, for jobs with `network { mode = "bridge" }`. ``drop_ins`` installs the
    plugin again under seed drivers' names (alias -> its `config { ... }` body, as HCL, or
    None when one of ``extra_configs``, further agent config files, has its `plugin` block).
    ``host_volumes`` (name -> host directory) become the client's `host_volume` blocks.
    With ``acl`` Nomad's ACLs are on and bootstrapped: ``agent.token`` is the management token.
    ``raw_exec`` enables Nomad's raw_exec driver.
    """
    workdir = Path(tempfile.mkdtemp(prefix="nve-", dir="/tmp"))
    agent = DevAgent(
        DevAgentConfig(
            workdir=workdir,
            nomad_binary=nomad_binary(),
            driver_executable=REPO / ".venv" / "bin" / "nomad-driver-vm",
            image_paths=image_paths,
            dev=dev,
            netns=netns,
            plugin_network=plugin_network,
            consul_address=consul_address,
            cni_path=cni_path,
            plugin_extra=plugin_extra,
            drop_ins=drop_ins or {},
            acl=acl,
            raw_exec=raw_exec,
            extra_configs=extra_configs,
            host_volumes=host_volumes or {},
        )
    )
    agent.start()
    try:
        if acl:
            agent.bootstrap_acl()
        agent.wait_driver()
        yield agent
    finally:
        agent.stop()
        leftover = [(p, " ".join(p.cmdline())) for p in vm_processes_under(workdir)]
        # The machine is cleaned up either way; the test still fails below.
        for proc, _ in leftover:
            proc.kill()
        print(f"agent log: {agent.log_path}")
        agent.remove()
        # A dev agent destroys its allocations when it shuts down: a VM or a virtiofsd still
        # running is a leak. (A non-dev agent leaves its VMs running on purpose, for recovery.)
        if dev and leftover and sys.exc_info()[0] is None:
            pytest.fail(f"processes outlived the agent: {[cmd for _, cmd in leftover]}")


@pytest.fixture(scope="module")
def agent(tiny_guest) -> Iterator[DevAgent]:  # type: ignore[no-untyped-def]
    with running_agent([tiny_guest.vmlinux.parent]) as dev:
        yield dev


def allocations(agent: DevAgent, job: str) -> list[dict[str, object]]:
    allocs = agent.api(f"/v1/job/{job}/allocations")
    assert isinstance(allocs, list)
    return allocs


def wait_alloc(
    agent: DevAgent, job: str, statuses: set[str], timeout: float = 180.0
) -> dict[str, object]:
    """Wait for the job's newest allocation to reach one of ``statuses``; return its details."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        allocs = allocations(agent, job)
        if allocs:
            newest = max(allocs, key=lambda a: int(a["CreateIndex"]))  # type: ignore[call-overload]
            last = newest["ClientStatus"]
            if last in statuses:
                full = agent.api(f"/v1/allocation/{newest['ID']}")
                assert isinstance(full, dict)
                return full
        time.sleep(0.5)
    raise TimeoutError(f"job {job}: allocation status {last}, wanted {statuses}")


def task_messages(agent: DevAgent, alloc_id: str, task: str) -> list[str]:
    """The task's events as Nomad shows them (DisplayMessage), oldest first."""
    alloc = agent.api(f"/v1/allocation/{alloc_id}")
    events = alloc["TaskStates"][task]["Events"]  # type: ignore[index]
    return [str(e.get("DisplayMessage", "")) for e in events]


def wait_until_empty(directory: Path, timeout: float) -> bool:
    """True once the plugin data_dir ``directory`` is gone or holds no task's state (polled
    until ``timeout``); the plugin's control socket stays while the plugin runs."""
    return wait_until(lambda: not task_state_in(directory), timeout)


@contextlib.contextmanager
def private_netns(link_prefixes: tuple[str, ...]) -> Iterator[str]:
    """A new network namespace ``nve-<random>`` (loopback up) for an agent whose bridge, TAPs,
    addresses and nftables rules must stay out of the host's own namespace; deleted and checked
    for leaks afterwards (tests/netns.py)."""
    with isolated_namespaces(link_prefixes, prefix="nve") as spaces:
        yield spaces.new()


# Nothing may leave this machine: no update check (checkpoint), no anonymous signature, and only
# the ports the test needs, all on loopback (no DNS, WAN serf or gRPC listeners).
# check_update_interval = 0: by default the agent syncs a check whose status did not change
# but whose output did to the catalog (what /v1/health/* reads) only every 5 minutes.
CONSUL_CONFIG = """
disable_update_check        = true
disable_anonymous_signature = true
check_update_interval       = "0s"
log_level                   = "INFO"
ports {{
  http     = {http}
  server   = {server}
  serf_lan = {serf_lan}
  serf_wan = -1
  dns      = -1
  grpc     = -1
  grpc_tls = -1
}}
"""


@dataclass
class ConsulAgent:
    process: subprocess.Popen[bytes]
    http_port: int
    log_path: Path

    @property
    def address(self) -> str:
        """HOST:PORT of the HTTP API, as Nomad's ``consul { address }`` wants it."""
        return f"127.0.0.1:{self.http_port}"

    def api(self, path: str) -> object:
        resp = httpx.get(f"http://{self.address}{path}", timeout=5.0)
        resp.raise_for_status()
        return resp.json()


@contextlib.contextmanager
def running_consul(timeout: float = 60.0) -> Iterator[ConsulAgent]:
    """A Consul dev agent (in-memory server, loopback only) in its own session; stopped and its
    directory removed afterwards. Fails when there is no consul binary (`make setup`)."""
    binary = tool_binary("consul")
    workdir = Path(tempfile.mkdtemp(prefix="nvc-", dir="/tmp"))
    http = free_port()
    (workdir / "consul.hcl").write_text(
        CONSUL_CONFIG.format(http=http, server=free_port(), serf_lan=free_port())
    )
    argv = [
        str(binary),
        "agent",
        "-dev",
        "-bind",
        "127.0.0.1",
        "-client",
        "127.0.0.1",
        "-disable-host-node-id",
        "-node",
        "nomad-vm-e2e",
        "-config-file",
        str(workdir / "consul.hcl"),
    ]
    log_path = workdir / "consul.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=workdir,
        )
    consul = ConsulAgent(process, http, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"consul exited: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if consul.api("/v1/status/leader"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"consul has no leader after {timeout:.0f}s (its log follows)")
            time.sleep(0.2)
        yield consul
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(OSError):
            print(log_path.read_text()[-4000:])
        shutil.rmtree(workdir, ignore_errors=True)


# The variables run_debian_job fills in, for jobs written inline by the tests.
DEBIAN_VARIABLES = """
variable "image" { type = string }
variable "kernel" { type = string }
variable "initramfs" { type = string }
variable "cmdline" { type = string }
"""


def run_debian_job(agent: DevAgent, job_file: Path, guest: Any) -> None:
    """`nomad job run -detach` a job taking the Debian test guest as variables (image, kernel,
    initramfs, cmdline), like examples/debian.nomad.hcl."""
    run_job(
        agent,
        job_file,
        image=guest.disk,
        kernel=guest.vmlinux,
        initramfs=guest.initrd,
        cmdline=guest.cmdline,
    )


def run_tiny_job(agent: DevAgent, job_file: Path, guest: Any) -> None:
    """The same for the tiny guest (kernel, initramfs), like examples/demo.nomad.hcl."""
    run_job(agent, job_file, kernel=guest.vmlinux, initramfs=guest.initramfs)


def run_job(agent: DevAgent, job_file: Path, **variables: object) -> None:
    var_args = [arg for k, v in variables.items() for arg in ("-var", f"{k}={v}")]
    agent.nomad("job", "run", "-detach", *var_args, str(job_file))

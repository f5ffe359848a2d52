"""A Nomad dev agent on loopback with our plugin loaded: used by `nomad-vm demo` and the e2e tests.

The agent runs in its own session so a test or a demo can stop it (and only it) cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nomad_vm.cli.hcl import PLUGIN_NAME, hcl_string, plugin_block
from nomad_vm.cli.install import wrapper_script
from nomad_vm.identity import ALIASES
from nomad_vm.network.netns import netns_path, run_in

PLUGIN_FILE = PLUGIN_NAME
FINGERPRINT_DENYLIST = "env_aws,env_gce,env_azure,env_digitalocean,consul,vault"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_plugin_launcher(plugin_dir: Path, driver_executable: Path) -> Path:
    """Nomad runs files named like their `plugin` block; ours execs the installed console script."""
    plugin_dir.mkdir(parents=True, exist_ok=True)
    launcher = plugin_dir / PLUGIN_FILE
    launcher.write_text(wrapper_script(driver_executable))
    launcher.chmod(0o755)
    return launcher


@dataclass(frozen=True)
class InstalledPlugin:
    """What `nomad-vm install` wrote: the plugin_dir with the wrapper, the plugin block's file."""

    plugin_dir: Path
    config_file: Path


@dataclass
class DevAgentConfig:
    workdir: Path
    nomad_binary: Path
    # The plugin this agent loads: the console script a launcher of ours execs, and the plugin
    # block's options below (image_paths ... plugin_network); or, with `installed`, what
    # `nomad-vm install` wrote, and then those fields are not used.
    driver_executable: Path | None = None
    image_paths: Sequence[Path] = ()
    accelerator: str = "auto"
    log_level: str = "DEBUG"
    # dev=False runs a real single-node server+client whose state survives an agent restart.
    dev: bool = True
    http_port: int = field(default_factory=free_port)
    rpc_port: int = field(default_factory=free_port)
    serf_port: int = field(default_factory=free_port)
    # Run the agent, and so the plugin, the VMs and everything they create on the host (bridge,
    # TAPs, nftables rules), inside this named network namespace (`ip netns add NAME`). Its HTTP
    # API is then on that namespace's loopback: use DevAgent.api/nomad/command, which go there.
    netns: str | None = None
    # The plugin's `network { ... }` block (attribute -> value), e.g. {"subnet_cidr": "..."}.
    plugin_network: Mapping[str, object] | None = None
    # More of the plugin's options (attribute or block name -> value), e.g.
    # {"cloud_hypervisor": {"bin": "..."}}.
    plugin_extra: Mapping[str, object] | None = None
    # HOST:PORT of a Consul agent's HTTP API (e.g. a loopback `consul agent -dev`): the agent then
    # gets a `consul { address = ... }` block and its consul fingerprinter (which jobs with
    # `provider = "consul"` services are constrained on) is no longer denied. None: no Consul.
    consul_address: str | None = None
    # The client's `cni_path`: where Nomad finds the CNI plugins its bridge networking mode
    # (`network { mode = "bridge" }`) runs, e.g. /usr/lib/cni (Debian's
    # containernetworking-plugins). None: Nomad's default (/opt/cni/bin).
    cni_path: Path | None = None
    installed: InstalledPlugin | None = None
    # The agent's PATH, which the plugin and what it starts (QEMU, virtiofsd) inherit.
    # None: ours.
    path: str | None = None
    # The same plugin installed again under seed drivers' names (nomad_vm.identity): alias
    # ("virt", "ch") -> the body of its `config { ... }` block as HCL text, written as given
    # (e.g. a seed's client config), or None: only the wrapper, its `plugin` block being in
    # one of extra_configs. Only with driver_executable.
    drop_ins: Mapping[str, str | None] = field(default_factory=dict)
    # More agent config files, passed as further -config options (e.g. a seed's client config
    # file as written).
    extra_configs: Sequence[Path] = ()
    # The client's host volumes: name -> host path (`host_volume "<name>" { path = ... }`).
    host_volumes: Mapping[str, Path] = field(default_factory=dict)
    # Nomad's ACL system on: nothing answers without a token until DevAgent.bootstrap_acl().
    acl: bool = False
    # Nomad's raw_exec driver on (for the tools jobs run on a node, e.g. the console server).
    raw_exec: bool = False

    @property
    def fingerprint_denylist(self) -> str:
        if self.consul_address is None:
            return FINGERPRINT_DENYLIST
        return ",".join(n for n in FINGERPRINT_DENYLIST.split(",") if n != "consul")

    def render(self) -> str:
        server = (
            ""
            if self.dev
            else """
server {
  enabled          = true
  bootstrap_expect = 1
}
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}"""
        )
        client_role = (
            ""
            if self.dev
            else f"""
  enabled = true
  servers = ["127.0.0.1:{self.rpc_port}"]"""
        )
        consul = (
            ""
            if self.consul_address is None
            else f"""
consul {{
  address = {hcl_string(self.consul_address)}
}}"""
        )
        cni = "" if self.cni_path is None else f"\n  cni_path = {hcl_string(str(self.cni_path))}"
        acl = "\nacl {\n  enabled = true\n}" if self.acl else ""
        cni += "".join(  # the client block's host volumes
            f"\n  host_volume {hcl_string(name)} {{\n    path = {hcl_string(str(path))}\n  }}"
            for name, path in self.host_volumes.items()
        )
        return f"""
bind_addr = "127.0.0.1"
log_level = "{self.log_level}"
ports {{
  http = {self.http_port}
  rpc  = {self.rpc_port}
  serf = {self.serf_port}
}}{server}{consul}{acl}
# Nothing may leave this machine: no update check against HashiCorp's servers, and no
# fingerprinters that probe cloud metadata addresses or resolve Consul/Vault names.
disable_update_check = true
# Without this Nomad 1.11 never calls TaskStats (dev mode turns it on implicitly).
telemetry {{
  publish_allocation_metrics = true
}}
client {{{client_role}{cni}
  network_interface = "lo"
  options = {{
    "fingerprint.denylist" = "{self.fingerprint_denylist}"
  }}
}}
{self.plugin_block()}{self.raw_exec_block()}"""

    def raw_exec_block(self) -> str:
        if not self.raw_exec:
            return ""
        return '\nplugin "raw_exec" {\n  config {\n    enabled = true\n  }\n}\n'

    def plugin_block(self) -> str:
        if self.installed is not None:
            return ""  # in the installed config file, the agent's second -config
        config: dict[str, object] = {
            "data_dir": str(self.workdir / "plugin-data"),
            "image_paths": [str(p) for p in self.image_paths],
            "accelerator": self.accelerator,
        }
        if self.plugin_network is not None:
            config["network"] = self.plugin_network
        config.update(self.plugin_extra or {})
        return plugin_block(config) + "".join(
            f"\nplugin {hcl_string(ALIASES[alias].file_name)} {{\n  config {{\n{body}\n  }}\n}}\n"
            for alias, body in self.drop_ins.items()
            if body is not None
        )


class DevAgent:
    def __init__(self, config: DevAgentConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config.workdir / "nomad.log"
        # The management token once bootstrap_acl() made it (memory only: never in argv, logs or
        # files; the CLI gets it as NOMAD_TOKEN in its environment).
        self.token: str | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.config.http_port}"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "NOMAD_ADDR": self.address}
        if self.token is not None:
            env["NOMAD_TOKEN"] = self.token
        return env

    @property
    def netns_prefix(self) -> list[str]:
        """What runs a command in the agent's network namespace (empty: the caller's).

        nsenter enters only the network namespace. `ip netns exec` would also give the agent a
        mount namespace with a fresh /sys, without the cgroup file systems Nomad's client uses.
        """
        if self.config.netns is None:
            return []
        return ["nsenter", f"--net={netns_path(self.config.netns)}", "--"]

    def command(self, *args: str) -> list[str]:
        """argv of the `nomad` CLI with ``args``, run where this agent's API is reachable
        (pass ``env=self.env``)."""
        return [*self.netns_prefix, str(self.config.nomad_binary), *args]

    def start(self) -> None:
        cfg = self.config
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        configs = [cfg.workdir / "agent.hcl", *cfg.extra_configs]
        if cfg.installed is not None:
            plugin_dir = cfg.installed.plugin_dir
            configs.append(cfg.installed.config_file)
        elif cfg.driver_executable is not None:
            launcher = write_plugin_launcher(cfg.workdir / "plugins", cfg.driver_executable)
            plugin_dir = launcher.parent
            for alias in cfg.drop_ins:
                identity = ALIASES[alias]
                wrapper = plugin_dir / identity.file_name
                wrapper.write_text(wrapper_script(cfg.driver_executable, identity))
                wrapper.chmod(0o755)
        else:
            raise ValueError("DevAgentConfig needs driver_executable or installed")
        configs[0].write_text(cfg.render())
        argv = [
            *self.netns_prefix,
            str(cfg.nomad_binary),
            "agent",
            *(["-dev"] if cfg.dev else []),
            *(arg for config in configs for arg in ("-config", str(config))),
            "-plugin-dir",
            str(plugin_dir),
            "-data-dir",
            str(cfg.workdir / "data"),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cfg.workdir,
                env=None if cfg.path is None else {**os.environ, "PATH": cfg.path},
            )

    def api(self, path: str, method: str = "GET", body: object = None) -> object:
        def call() -> object:
            headers = {"X-Nomad-Token": self.token} if self.token is not None else {}
            resp = httpx.request(
                method, self.address + path, json=body, headers=headers, timeout=5.0
            )
            resp.raise_for_status()
            return resp.json() if resp.content else None

        # httpx connects from the calling thread: one that entered the agent's namespace.
        return call() if self.config.netns is None else run_in(self.config.netns, call)

    def bootstrap_acl(self, timeout: float = 60.0) -> str:
        """Bootstrap the ACL system (once the agent has a leader); keep and return the
        management token's secret."""
        deadline = time.monotonic() + timeout
        last: object = "agent not answering"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nomad agent exited; see {self.log_path}")
            try:
                answer = self.api("/v1/acl/bootstrap", "POST")
            except httpx.HTTPStatusError as exc:
                last = f"{exc.response.status_code} {exc.response.text.strip()}"
            except httpx.HTTPError as exc:
                last = exc
            else:
                assert isinstance(answer, dict)
                self.token = str(answer["SecretID"])
                return self.token
            time.sleep(0.5)
        raise TimeoutError(f"ACL bootstrap did not succeed in {timeout:.0f}s: {last}")

    def wait_driver(self, timeout: float = 120.0, name: str = "vm") -> dict[str, object]:
        """Wait until the node reports driver ``name`` detected and healthy; return its info."""
        deadline = time.monotonic() + timeout
        last: object = "agent not answering"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nomad agent exited; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                nodes = self.api("/v1/nodes")
                if isinstance(nodes, list) and nodes:
                    node = self.api(f"/v1/node/{nodes[0]['ID']}")
                    assert isinstance(node, dict)
                    info = (node.get("Drivers") or {}).get(name)
                    last = info
                    if info and info.get("Detected") and info.get("Healthy"):
                        return {"node": node, "driver": info}
            time.sleep(0.5)
        raise TimeoutError(f"driver {name} not healthy after {timeout:.0f}s: {last}")

    def nomad(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run the real `nomad` CLI against this agent; returns stdout (stderr on failure)."""
        proc = subprocess.run(
            self.command(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"nomad {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout + (proc.stderr if proc.returncode else "")

    def restart(self) -> None:
        """Stop the agent (SIGINT: tasks keep running) and start it again on the same state."""
        self.stop()
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def remove(self) -> None:
        """Delete the agent's directory, after unmounting what Nomad left mounted in it."""
        remove_tree(self.config.workdir)


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def remove_tree(root: Path) -> None:
    """rmtree that first unmounts Nomad's per-task tmpfs mounts (secrets/, private/).

    An agent stopped before it cleaned an allocation leaves them mounted; deleting through a
    mount would empty it but leak the mount itself.
    """
    for point in mounts_under(root):
        subprocess.run(["umount", point], check=False, capture_output=True)
    left = mounts_under(root)
    if left:
        raise RuntimeError(f"cannot remove {root}: still mounted: {', '.join(left)}")
    shutil.rmtree(root, ignore_errors=True)

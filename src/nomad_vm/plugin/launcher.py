"""Start a plugin executable the way Nomad's go-plugin client does, and connect to it.

Used by the plugin-process tests and by bench/plugin_start.py: the environment, the handshake
parsing and the gRPC dial follow go-plugin's client (see docs/plugin-protocol.md).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from nomad_vm.plugin.handshake import COOKIE_KEY, COOKIE_VALUE


def nomad_plugin_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment go-plugin gives a plugin launched by Nomad."""
    env = dict(os.environ)
    env.update(
        {
            COOKIE_KEY: COOKIE_VALUE,
            "PLUGIN_PROTOCOL_VERSIONS": "2",
            "PLUGIN_MIN_PORT": "10000",
            "PLUGIN_MAX_PORT": "25000",
        }
    )
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Handshake:
    core: int
    app: int
    network: str
    address: str
    protocol: str

    @classmethod
    def parse(cls, line: str) -> Handshake:
        parts = line.strip().split("|")
        if len(parts) < 5:
            raise ValueError(f"Unrecognized remote plugin message: {line!r}")
        return cls(int(parts[0]), int(parts[1]), parts[2], parts[3], parts[4])

    @property
    def target(self) -> str:
        return f"unix:{self.address}" if self.network == "unix" else self.address


class PluginProcess:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = nomad_plugin_env(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.handshake: Handshake | None = None
        self.channel: grpc.Channel | None = None
        self.stderr_path: Path | None = None

    def start(self, stderr_path: Path, timeout: float = 60.0) -> Handshake:
        """Exec the plugin and read the first stdout line, as go-plugin does."""
        self.stderr_path = stderr_path
        with open(stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"plugin exited before the handshake; stderr in {stderr_path}")
        self.handshake = Handshake.parse(line)
        self.channel = grpc.insecure_channel(
            self.handshake.target,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        return self.handshake

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            time.sleep(0.01)
        return None

    def kill(self) -> None:
        """End the plugin as an operator would (SIGTERM: its socket directory goes too), or
        SIGKILL it when it does not go within 5 s. A crash is ``process.send_signal(SIGKILL)``."""
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

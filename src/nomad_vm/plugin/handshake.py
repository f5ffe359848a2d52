"""The go-plugin handshake: how Nomad finds our gRPC server.

Nomad starts the plugin with NOMAD_PLUGIN_MAGIC_COOKIE set, then reads the first stdout line,
``1|2|unix|/path/to.sock|grpc``. The socket must already be listening when that line appears.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COOKIE_KEY = "NOMAD_PLUGIN_MAGIC_COOKIE"
COOKIE_VALUE = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255"
CORE_PROTOCOL = 1
APP_PROTOCOL = 2

NOT_A_PROGRAM = """\
nomad-driver-vm is a Nomad task driver plugin, not a program to run by hand.

Put it in the Nomad agent's plugin_dir and add to the agent configuration:

    plugin "nomad-driver-vm" {
      config {
        image_paths = ["/srv/vm-images"]
      }
    }

Jobs then use driver = "vm". To check this host, run: nomad-vm doctor
"""


def launched_by_nomad() -> bool:
    return os.environ.get(COOKIE_KEY) == COOKIE_VALUE


def supports_protocol() -> bool:
    offered = os.environ.get("PLUGIN_PROTOCOL_VERSIONS", str(APP_PROTOCOL))
    return str(APP_PROTOCOL) in {v.strip() for v in offered.split(",")}


def make_socket_dir() -> Path:
    """A private 0700 directory for the socket (short path: unix sockets allow 108 bytes).

    What tempfile.mkdtemp does (a random name, created 0700 or retried), without importing
    tempfile and, through it, random and shutil: ~5% of the handshake."""
    base = os.environ.get("PLUGIN_UNIX_SOCKET_DIR") or os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = Path(base) / f"nomad-vm-{os.urandom(6).hex()}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path


def handshake_line(socket_path: Path) -> str:
    return f"{CORE_PROTOCOL}|{APP_PROTOCOL}|unix|{socket_path}|grpc\n"


def announce(socket_path: Path) -> None:
    """Write the handshake line straight to fd 1, flushed, so nothing can precede it."""
    os.write(sys.stdout.fileno(), handshake_line(socket_path).encode())

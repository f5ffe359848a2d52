"""Where a start's runtime directory goes (sockets, seed, firmware variables, VMM logs).

``<task dir>/nomad-vm-<start id>``: per start, so a restart never meets leftovers of an earlier
one. A unix socket's path is limited to 108 bytes: when the backend's longest socket name would
not fit there, the directory is ``<data_dir>/run/<hash of the task id>`` instead, and that
``run`` directory goes with the last task using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from nomad_vm.driver.config import RUNTIME_PREFIX
from nomad_vm.driver.types import TaskConfig

# Unix socket paths are limited to 108 bytes; beyond this the runtime dir moves to data_dir.
MAX_SOCKET_PATH = 100
# The longest socket name a backend puts in the runtime dir ("qmp.sock", "vfs12.sock", ...).
LONGEST_SOCKET_NAME = "tty-0123abcd.sock"
RUN_DIR = "run"


def runtime_dir(task: TaskConfig, data_dir: Path) -> Path:
    """``<task dir>/nomad-vm-<start id>``: per start, so a restart never meets leftovers of an
    earlier one; under data_dir when the socket path would be too long for unix sockets."""
    start_id = re.sub(r"[^A-Za-z0-9]", "", task.id.rsplit("/", 1)[-1])[:12] or "x"
    preferred = Path(task.task_dir) / f"{RUNTIME_PREFIX}-{start_id}"
    if len(str(preferred / LONGEST_SOCKET_NAME)) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(task.id.encode()).hexdigest()[:16]
    return data_dir / RUN_DIR / digest


def remove_run_dir_if_empty(data_dir: Path) -> None:
    """The parent of long-path runtime dirs goes with the last of them (a start that makes
    one meanwhile recreates it: mkdir(parents=True))."""
    with contextlib.suppress(OSError):
        os.rmdir(data_dir / RUN_DIR)

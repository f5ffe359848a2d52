"""Where the operator tools keep things: the guest cache, the Nomad binary, the demo's files."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from pathlib import Path


def guest_cache_dir() -> Path:
    env = os.environ.get("NOMAD_VM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nomad-vm" / "guests"


def nomad_binary() -> Path:
    return tool_binary("nomad")


def tool_binary(name: str) -> Path:
    """$<NAME>_BINARY, else ``name`` on PATH (make setup puts .tools/bin first on PATH)."""
    variable = f"{name.upper()}_BINARY"
    env = os.environ.get(variable)
    if env:
        return Path(env)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"no {name} binary: run `make setup`, or set {variable}")
    return Path(found)


def driver_executable() -> Path:
    """The installed `nomad-driver-vm` console script next to this Python."""
    candidate = Path(sys.executable).parent / "nomad-driver-vm"
    if candidate.exists():
        return candidate
    found = shutil.which("nomad-driver-vm")
    if not found:
        raise FileNotFoundError("nomad-driver-vm is not installed: run `make setup`")
    return Path(found)


def demo_dir() -> Path:
    """Where `nomad-vm demo` keeps the dev agent's files (its config, the plugin launcher it
    runs, the plugin's data, the pid `--stop` signals): ``$NOMAD_VM_DEMO_DIR``, else
    ``$XDG_STATE_HOME/nomad-vm/demo`` (``~/.local/state/nomad-vm/demo``). Never a fixed path in
    a shared directory such as /tmp, where another user could create it first (or a symlink
    by that name) and have the demo run their launcher or signal their pid. Use it through
    ``private_dir``."""
    env = os.environ.get("NOMAD_VM_DEMO_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "nomad-vm" / "demo"


class NotPrivateError(Exception):
    """A directory that should be this user's alone is not; the message says what to do."""


def cluster_dir() -> Path:
    """Where `nomad-vm cluster` keeps its bed (agents' configs, data and logs, the state file
    `--stop` reads): ``$NOMAD_VM_CLUSTER_DIR``, else ``$XDG_STATE_HOME/nomad-vm/cluster``; a
    private directory for the same reasons as ``demo_dir``."""
    env = os.environ.get("NOMAD_VM_CLUSTER_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "nomad-vm" / "cluster"


def private_dir(path: Path, *, create: bool = True) -> Path:
    """``path`` as a directory only this user can use: created with mode 0700 (missing parents
    too) when ``create``, or checked when it exists: a real directory (not a symlink), owned by
    this user, with no permissions for group or others. NotPrivateError otherwise (also when it
    is missing and not ``create``)."""
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise NotPrivateError(f"{path} does not exist") from None
    fix = f"remove it (`rm -rf {path}`) if it is not yours, or set NOMAD_VM_DEMO_DIR"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NotPrivateError(f"{path} is not a directory (a symlink or a file); {fix}")
    if info.st_uid != os.geteuid():
        raise NotPrivateError(f"{path} belongs to uid {info.st_uid}, not to you; {fix}")
    if info.st_mode & 0o077:
        raise NotPrivateError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, open to other users; "
            f"`chmod 700 {path}` if its content is yours, otherwise {fix}"
        )
    return path

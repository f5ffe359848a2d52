"""Where the operator tools keep things: the guest cache, the Nomad binary, the demo's files."""

from __future__ import annotations

import os
import shutil
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
    return Path(os.environ.get("NOMAD_VM_DEMO_DIR", "/tmp/nomad-vm-demo"))

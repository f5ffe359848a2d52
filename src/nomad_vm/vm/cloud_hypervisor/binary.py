"""Locate the ``cloud-hypervisor`` binary and ask its version (``cloud-hypervisor v53.0``)."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.executables import find_executable

CLOUD_HYPERVISOR = "cloud-hypervisor"
# No distribution package reachable from these hosts ships it (Debian has none).
HINT = (
    "install Cloud Hypervisor (a release binary from github.com/cloud-hypervisor/"
    "cloud-hypervisor) or set cloud_hypervisor.bin in the plugin config"
)
VERSION_TIMEOUT = 10.0
_VERSION_RE = re.compile(r"\bv?(\d+\.\d+(?:\.\d+)?)\b")


def find_cloud_hypervisor(configured: str | None) -> Path:
    return find_executable(configured, CLOUD_HYPERVISOR, "cloud_hypervisor.bin", HINT)


def parse_version(text: str) -> str | None:
    """ "cloud-hypervisor v53.0" -> "53.0" (also "v41.0-12-gabcdef" builds -> "41.0")."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VERSION_RE.search(first)
    return match.group(1) if match else None


def cloud_hypervisor_version(binary: Path) -> str:
    """``binary --version``, parsed; cached per path and modification time."""
    try:
        mtime_ns = binary.stat().st_mtime_ns
    except OSError as exc:
        raise HypervisorError(f"{binary}: cannot stat: {exc.strerror}") from exc
    return _cached(str(binary), mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached(binary: str, mtime_ns: int) -> str:
    del mtime_ns  # only part of the cache key
    try:
        done = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        took = f"{binary} --version did not finish in {VERSION_TIMEOUT:g} s"
        raise HypervisorError(took) from exc
    except OSError as exc:
        raise HypervisorError(f"cannot run {binary} --version: {exc.strerror}") from exc
    output = done.stdout or done.stderr
    version = parse_version(output) if done.returncode == 0 else None
    if version is None:
        said = output.strip()[-400:] or "no output"
        raise HypervisorError(
            f"{binary} --version (status {done.returncode}) gave no version number: {said!r}"
        )
    return version

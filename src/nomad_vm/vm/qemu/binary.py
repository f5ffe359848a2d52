"""Locate the QEMU binaries and ask them their version.

OSError and subprocess failures are translated into HypervisorError here, at the edge where the
binary is touched, so callers (fingerprint, start) only ever see the project's error types.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.executables import find_executable
from nomad_vm.storage.tools import find_qemu_img as find_qemu_img

QEMU_SYSTEM = "qemu-system-x86_64"
QEMU_SYSTEM_HINT = "install Debian's qemu-system-x86 or set qemu_binary in the plugin config"
# "--version" only prints; a binary that takes longer is broken (or the host is on fire).
VERSION_TIMEOUT = 10.0
_OUTPUT_TAIL = 400

# Both "QEMU emulator version 7.2.19 (Debian ...)" and "qemu-img version 7.2.19 (...)".
_VERSION_RE = re.compile(r"\bversion\s+v?(\d+\.\d+(?:\.\d+)?)\b", re.IGNORECASE)


def find_qemu(configured: str | None = None) -> Path:
    """The system emulator: ``configured`` (a path or a name on PATH), else qemu-system-x86_64."""
    return find_executable(configured, QEMU_SYSTEM, "qemu_binary", QEMU_SYSTEM_HINT)


def parse_qemu_version(text: str) -> str | None:
    """The dotted version from ``--version`` output, e.g. "7.2.19"; None if there is none."""
    match = _VERSION_RE.search(text)
    return match.group(1) if match else None


def qemu_version(binary: Path) -> str:
    """``binary --version``, parsed; cached per path and modification time, so an upgraded
    binary is asked again while the periodic fingerprint does not fork every time."""
    try:
        mtime_ns = binary.stat().st_mtime_ns
    except OSError as exc:
        raise HypervisorError(f"{binary}: cannot stat: {exc.strerror}") from exc
    return _cached_version(str(binary), mtime_ns)


def clear_version_cache() -> None:
    _cached_version.cache_clear()


@functools.lru_cache(maxsize=16)
def _cached_version(binary: str, mtime_ns: int) -> str:
    del mtime_ns  # only part of the cache key
    output = _run_version(binary)
    version = parse_qemu_version(output)
    if version is None:
        first_line = output.strip().splitlines()[0] if output.strip() else "nothing"
        raise HypervisorError(f"{binary} --version printed no version number: {first_line!r}")
    return version


def _run_version(binary: str) -> str:
    argv = [binary, "--version"]
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(
            f"{binary} --version did not finish within {VERSION_TIMEOUT:g} s"
        ) from exc
    except OSError as exc:
        raise HypervisorError(f"cannot run {binary} --version: {exc.strerror}") from exc
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip())[-_OUTPUT_TAIL:] or "no output"
        raise HypervisorError(f"{binary} --version exited with status {done.returncode}: {detail}")
    return done.stdout

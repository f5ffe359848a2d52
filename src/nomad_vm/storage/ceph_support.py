"""Can this node serve Ceph pools? QEMU must have its rbd block driver (Debian ships it
apart, in ``qemu-block-extra``) and the plugin the Ceph bindings (``storage.ceph_bindings``).

QEMU is asked directly: a ``-blockdev driver=rbd`` without its pool fails at once with
"Parameter 'pool' is missing" when the driver exists (nothing is connected to), and with
"does not accept value 'rbd'" when it does not. Cached per binary and modification time, like
its version, so an upgrade is seen.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from nomad_vm.executables import find_executable
from nomad_vm.storage.ceph_bindings import CephUnavailable, load

PROBE_TIMEOUT = 20.0
HINT = "install Debian's qemu-block-extra (QEMU's rbd block driver)"
QEMU_SYSTEM = "qemu-system-x86_64"


def ceph_problem(qemu_binary: str | None) -> str | None:
    """Why Ceph pools cannot be served here, or None when they can."""
    try:
        binary = find_executable(qemu_binary, QEMU_SYSTEM, "qemu_binary", "install QEMU")
        problem = _probe(str(binary), os.stat(binary).st_mtime_ns)
    except Exception as exc:  # no QEMU at all: the fingerprint says so elsewhere
        return f"QEMU cannot be checked for its rbd driver: {exc}"
    if problem is not None:
        return problem
    try:
        load()
    except CephUnavailable as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=8)
def _probe(binary: str, mtime_ns: int) -> str | None:
    del mtime_ns  # only part of the cache key
    argv = [binary, "-nodefaults", "-machine", "none", "-display", "none", "-S",
            "-blockdev", "driver=rbd,node-name=probe"]  # fmt: skip
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {binary} to check its rbd driver: {exc}"
    if "'pool' is missing" in done.stderr:
        return None
    said = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
    return f"{Path(binary).name} has no rbd block driver ({said[0]}): {HINT}"

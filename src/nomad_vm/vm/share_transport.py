"""How Nomad's directories and volumes reach the guest: virtio-fs (a virtiofsd per share) or 9p.

A binary named ``virtiofsd`` is not enough to choose virtio-fs: Debian 12's qemu-system-common
ships QEMU's legacy C daemon at /usr/lib/qemu/virtiofsd, which takes ``-o source=...`` instead of
our options, has no read-only mode, and exits at once when given the Rust daemon's command line
(QEMU then fails with "Connection refused"). So every candidate is asked, through its own
``--help``, whether it understands the options the driver passes, and the first that does wins.
Without one, ``auto`` falls back to 9p and says why; the reason reaches the fingerprint, the
task's events and ``nomad-vm doctor``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError, VMRequestError
from nomad_vm.executables import find_executable
from nomad_vm.schema import SHARE_TRANSPORTS

VIRTIOFSD = "virtiofsd"
VIRTIOFSD_HINT = (
    "for virtio-fs install the Rust virtiofsd (`cargo install virtiofsd`, which `make setup` "
    "does, or Debian 13's virtiofsd package) and put it on the agent's PATH or set "
    "virtiofsd_binary in the plugin config"
)
# Where distributions put it (not on PATH there). Debian 12's is the legacy C daemon.
LIBEXEC_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
# Every option nomad_vm.vm.virtiofsd.daemon_argv passes; a daemon must know all of them.
REQUIRED_OPTIONS = (
    "--fd",
    "--shared-dir",
    "--tag",
    "--sandbox",
    "--cache",
    "--readonly",
    "--inode-file-handles",
)
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ShareTransport:
    name: str  # "virtiofs" or "9p"
    virtiofsd: Path | None
    reason: str
    # True when 9p was chosen although virtio-fs was wanted (``auto`` found no usable daemon).
    fallback: bool = False


@dataclass(frozen=True)
class VirtiofsdBinary:
    """What a virtiofsd executable turned out to be."""

    path: Path
    version: str
    # Why the driver cannot use it; empty when it can.
    problem: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem


def choose_share_transport(requested: str, configured_binary: str | None) -> ShareTransport:
    """``auto``: virtio-fs with the first usable virtiofsd, else 9p with the reason.
    ``virtiofs`` without one, or a configured binary that is unusable, is a VMRequestError
    naming the setting (the node then reports itself unhealthy with this message)."""
    if requested not in SHARE_TRANSPORTS:
        choices = ", ".join(SHARE_TRANSPORTS)
        raise VMRequestError("share_transport", f"{requested!r} is not one of {choices}")
    if requested == "9p":
        return ShareTransport("9p", None, "share_transport = 9p")
    if configured_binary and configured_binary.strip():
        # An operator who named a binary wants that one: a wrong one is an error, not 9p.
        try:
            found = identify_virtiofsd(find_virtiofsd(configured_binary))
        except HypervisorError as exc:
            raise VMRequestError("virtiofsd_binary", str(exc)) from None
        if not found.usable:
            raise VMRequestError("virtiofsd_binary", f"{found.problem}; {VIRTIOFSD_HINT}")
        return _virtiofs(found)
    problems = []
    for candidate in virtiofsd_candidates():
        found = identify_virtiofsd(candidate)
        if found.usable:
            return _virtiofs(found)
        problems.append(found.problem)
    why = "; ".join(problems) or "virtiofsd not found on PATH"
    if requested == "virtiofs":
        raise VMRequestError(
            "share_transport", f"virtiofs needs virtiofsd: {why}; {VIRTIOFSD_HINT}"
        )
    return ShareTransport("9p", None, f"9p because {why} ({VIRTIOFSD_HINT})", fallback=True)


def _virtiofs(daemon: VirtiofsdBinary) -> ShareTransport:
    return ShareTransport(
        "virtiofs", daemon.path, f"virtio-fs with {daemon.version} at {daemon.path}"
    )


def find_virtiofsd(configured: str | None) -> Path:
    return find_executable(configured, VIRTIOFSD, "virtiofsd_binary", VIRTIOFSD_HINT)


def virtiofsd_candidates() -> list[Path]:
    """``virtiofsd`` on PATH, then the distributions' libexec places, each file once."""
    found = [shutil.which(VIRTIOFSD), *LIBEXEC_PATHS]
    seen: dict[Path, Path] = {}
    for name in found:
        if name and os.access(name, os.X_OK) and Path(name).is_file():
            seen.setdefault(Path(name).resolve(), Path(name).absolute())
    return list(seen.values())


def identify_virtiofsd(path: Path) -> VirtiofsdBinary:
    """Ask ``path`` what it is (once per file version: the answer is cached)."""
    try:
        st = path.stat()
    except OSError as exc:
        return VirtiofsdBinary(path, "?", f"{path}: cannot stat: {exc.strerror}")
    return _identify(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.cache
def _identify(path: Path, _inode: int, _size: int, _mtime_ns: int) -> VirtiofsdBinary:
    try:
        version = _run(path, "--version")
        usage = _run(path, "--help")
    except (OSError, subprocess.SubprocessError) as exc:
        return VirtiofsdBinary(path, "?", f"{path} does not run: {exc}")
    first = version.splitlines()[0].strip() if version.strip() else "virtiofsd (no version)"
    if first.startswith("virtiofsd version") or "-o source=" in usage:
        return VirtiofsdBinary(
            path,
            first,
            f"{path} is QEMU's legacy C virtiofsd ({first.removeprefix('virtiofsd ')}), "
            "which takes other options and cannot serve a share read-only",
        )
    missing = [opt for opt in REQUIRED_OPTIONS if not re.search(rf"(?<![\w-]){opt}\b", usage)]
    if missing:
        return VirtiofsdBinary(
            path, first, f"{path} ({first}) does not know {', '.join(missing)} (too old?)"
        )
    return VirtiofsdBinary(path, first)


def _run(path: Path, flag: str) -> str:
    done = subprocess.run(
        [str(path), flag],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )
    return (done.stdout + done.stderr).decode("utf-8", errors="replace")

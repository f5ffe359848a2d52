"""A real DHCP client for tests: busybox ``udhcpc``, the client the tiny guest runs.

It comes from the busybox-static package the tiny guest is built from (in the guest cache), so
the host needs no busybox of its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import guest_cache

# udhcpc runs this with the offer in its environment; it only prints what it was told.
REPORT = """#!/bin/sh
[ "$1" = bound ] && echo "bound ip=$ip mask=$mask router=$router dns=$dns hostname=$hostname"
exit 0
"""


def extract_busybox(dest: Path) -> Path:
    debs = sorted((guest_cache() / "debs").glob("busybox-static_*.deb"))
    assert debs, "the tiny guest's build left no busybox-static package in the guest cache"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True, timeout=60)
    script = dest / "udhcpc-report.sh"
    script.write_text(REPORT)
    script.chmod(0o755)
    return dest / "bin" / "busybox"


def ask_for_lease(busybox: Path, ns: str, tries: int = 5) -> str:
    """One udhcpc run on ``eth0`` in namespace ``ns``: "bound ip=... mask=... router=... dns=...
    hostname=...", or "" when no server gave it a lease."""
    script = busybox.parent.parent / "udhcpc-report.sh"
    argv = [str(busybox), "udhcpc", "-i", "eth0", "-q", "-n", "-f",
            "-t", str(tries), "-T", "1", "-s", str(script)]  # fmt: skip
    out = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60
    )
    return "\n".join(line for line in out.stdout.splitlines() if line.startswith("bound"))

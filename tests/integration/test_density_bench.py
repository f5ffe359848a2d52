"""bench/density.py's code path at N=2: it prints its table and leaves no VM behind.

Not a measurement: nothing here looks at the numbers (timings on a shared TCG host say nothing),
only that both phases ran to the end and cleaned up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import REPO

BENCH = REPO / "bench" / "density.py"


def _leftovers() -> list[int]:
    """QEMUs the benchmark started: they hold descriptors under its /tmp/nvd-* directory
    (their command lines name only /proc/self/fd/N), deleted or not."""
    found = []
    for proc in psutil.process_iter(["name"]):
        if not (proc.info["name"] or "").startswith("qemu-system"):
            continue
        try:
            fds = Path(f"/proc/{proc.pid}/fd")
            links = [os.readlink(fd) for fd in fds.iterdir()] + [proc.cwd()]
        except (OSError, psutil.Error):
            continue  # gone meanwhile
        if any(link.startswith("/tmp/nvd-") for link in links):
            found.append(proc.pid)
    return found


def test_density_bench_two_vms(tiny_guest: object) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--vms", "2", "--settle", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "argv: the driver's and the bare one are the same" in out
    for row in ("time until all answer", "VMM PSS, sum", "MemAvailable drop", "plugin with 2"):
        assert row in out, out
    assert _leftovers() == []

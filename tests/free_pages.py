"""A tiny guest that fills memory and frees it, and its VMM's RSS at each step: for the free
page reporting test and benchmark. The guest pauses after each step so the host can sample
the VMM's memory; the host follows the guest's console markers, never a clock."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from tests.integration.pluginkit import FifoReader

MIB = 2**20
GUEST_MB = 512
# Written to the guest's /tmp (a tmpfs: half the guest's RAM at most), then removed.
FILL_MB = 200
MARK = "nomad-vm fill:"


def fill_and_free(fill_mb: int) -> str:
    """The guest's script: fill ``fill_mb`` MiB of its tmpfs, then free it."""
    return (
        f"echo '{MARK} base'; sleep 5; "
        f"dd if=/dev/zero of=/tmp/fill bs=1M count={fill_mb} 2>/dev/null; "
        f"echo '{MARK} filled'; sleep 5; rm /tmp/fill; echo '{MARK} freed'; sleep 3600"
    )


def guest_mb_for(fill_mb: int) -> int:
    """Guest RAM whose tmpfs (half of it) holds the fill, with room for the rest."""
    return max(GUEST_MB, 2 * fill_mb + 256)


FILL_AND_FREE = fill_and_free(FILL_MB)


@dataclass
class Samples:
    base: int
    filled: int
    # The lowest RSS seen after the guest freed the memory, and when (seconds after "freed").
    after: int
    after_s: float


def marker(step: str) -> bytes:
    return f"{MARK} {step}".encode()


def follow(
    fifo: FifoReader, qemu: psutil.Process, deadline: float, settle: float, fill_mb: int = FILL_MB
) -> Samples:
    """Sample the VMM's RSS at each guest step; after "freed", until it has fallen by
    three quarters of the fill, or for ``settle`` seconds (the guest may never give it back)."""
    assert fifo.wait_for(marker("base"), deadline - time.monotonic()), fifo.data[-2000:]
    base = qemu.memory_info().rss
    assert fifo.wait_for(marker("filled"), deadline - time.monotonic()), fifo.data[-2000:]
    filled = qemu.memory_info().rss
    assert fifo.wait_for(marker("freed"), deadline - time.monotonic()), fifo.data[-2000:]
    freed_at = time.monotonic()
    lowest, lowest_at = filled, 0.0
    target = filled - fill_mb * MIB * 3 // 4
    while time.monotonic() < min(deadline, freed_at + settle):
        rss = qemu.memory_info().rss
        if rss < lowest:
            lowest, lowest_at = rss, time.monotonic() - freed_at
        if lowest <= target:
            break
        time.sleep(0.5)
    return Samples(base, filled, lowest, lowest_at)

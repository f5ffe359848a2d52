"""Processes the driver starts and must find again after a plugin restart (QEMU, virtiofsd,
dnsmasq): a pid alone could have been recycled, so a process is known by its pid *and* its
start time."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    # psutil's create_time (seconds since the epoch, as the kernel reports it).
    start_time: float


def identity_of(pid: int) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def is_same_process(ident: ProcessIdentity) -> bool:
    """True when ``ident.pid`` still names the very process we started (not a recycled pid)."""
    current = identity_of(ident.pid)
    if current is None:
        return False
    try:
        if psutil.Process(ident.pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return abs(current.start_time - ident.start_time) < 0.05

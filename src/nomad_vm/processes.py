"""Processes the driver starts and must find again after a plugin restart (QEMU, virtiofsd,
dnsmasq). A pid alone could have been recycled, so a process is known by its pid, the moment it
started in clock ticks since boot (``/proc/PID/stat`` field 22) and the boot it started in
(``/proc/sys/kernel/random/boot_id``).

Ticks since boot come from the monotonic boot clock: unlike a wall-clock start time (psutil's
``create_time``, which is the boot time read from the wall clock plus those ticks) they do not
move when the clock is stepped, so a live VM is never mistaken for a recycled pid, and an equal
pair is an exact match, not one within a tolerance. The boot id makes a record from before a
host reboot name nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

PROC = "/proc"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
# Field 22 of /proc/PID/stat is starttime; fields 3.. follow the ")" that ends field 2 (comm).
_STARTTIME_AFTER_COMM = 22 - 3
_STATE_AFTER_COMM = 0
# How close a legacy record's wall-clock start time had to be (what the plugin used to accept).
_LEGACY_TOLERANCE = 0.05


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    # Clock ticks after boot at which the process started (fork time: exec does not change it).
    start_ticks: int
    boot_id: str

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> ProcessIdentity:
        """The inverse of ``to_dict``; ValueError (or KeyError, TypeError) on anything else."""
        pid, ticks, boot = raw["pid"], raw["start_ticks"], raw["boot_id"]
        if not isinstance(pid, int) or not isinstance(ticks, int) or not isinstance(boot, str):
            raise ValueError(f"not a process identity: {dict(raw)!r}")
        return cls(pid, ticks, boot)


@functools.cache
def boot_id() -> str:
    """This boot's id (it cannot change while the plugin runs)."""
    with open(BOOT_ID_FILE, encoding="ascii") as f:
        return f.read().strip()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``comm`` (which may hold spaces and parentheses)."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 1 :].decode("ascii", errors="replace").split()


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of the process ``pid`` now, or None if there is none."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= _STARTTIME_AFTER_COMM:
        return None
    return ProcessIdentity(pid, int(fields[_STARTTIME_AFTER_COMM]), boot_id())


def is_same_process(ident: ProcessIdentity) -> bool:
    """True when ``ident.pid`` still names the very process recorded (not a recycled pid, not a
    zombie that has already ended)."""
    fields = _stat_fields(ident.pid)
    if fields is None or len(fields) <= _STARTTIME_AFTER_COMM:
        return False
    if fields[_STATE_AFTER_COMM] in ("Z", "X"):
        return False
    current = ProcessIdentity(ident.pid, int(fields[_STARTTIME_AFTER_COMM]), boot_id())
    return current == ident


def identity_from_legacy(pid: int, create_time: float) -> ProcessIdentity | None:
    """A record written by an older plugin (pid + psutil's wall-clock create_time): the
    process's identity if ``pid`` still matches it as the older plugin would have checked it,
    else None. Lets VMs started before an upgrade be recovered and cleaned up."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) >= _LEGACY_TOLERANCE:
            return None
    except psutil.Error:
        return None
    return identity_of(pid)

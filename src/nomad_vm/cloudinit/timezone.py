"""Time zone names, checked against the IANA time zone database through ``zoneinfo``.

cloud-init in the guest refuses a zone its own database lacks, but only in the guest's log,
after the VM has started: so a name is checked here, when the task starts, against the host's
database (``/usr/share/zoneinfo``, or the ``tzdata`` package where the host has none, e.g. a
minimal container). The two databases can differ by zones added recently (``Europe/Kyiv`` came
in 2022b); a name both know is the common case, and a typo is caught either way.
"""

from __future__ import annotations

import difflib
import zoneinfo

from nomad_vm.errors import ConfigError

# In the database directory, but not zone names: Debian links ``localtime`` to the host's own
# /etc/localtime (the guest's would point at itself), and ``posixrules`` is a legacy default
# for POSIX TZ strings.
NOT_ZONES = frozenset({"localtime", "posixrules"})
_SUGGESTIONS = 3


def check_timezone(name: str, field: str) -> str:
    """``name`` if it is a zone of the database, else a ConfigError naming ``field``."""
    if name not in NOT_ZONES and _is_zone(name):
        return name
    raise ConfigError(field, _problem(name))


def _is_zone(name: str) -> bool:
    try:
        # Rejects absolute paths and ".." itself, and files that are not TZif zones (zone.tab).
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _problem(name: str) -> str:
    """Why ``name`` was refused, with close names when there are some."""
    if not _is_zone("UTC"):
        return (
            f"{name!r} cannot be checked: this host has no time zone database; install it "
            "(Debian: tzdata) or the Python package tzdata"
        )
    known = sorted(zoneinfo.available_timezones() - NOT_ZONES)
    by_lower_case = {zone.lower(): zone for zone in known}
    if name.lower() in by_lower_case:
        # Zone names are case-sensitive (they are file names), so "europe/berlin" is not one.
        close = [by_lower_case[name.lower()]]
    else:
        close = difflib.get_close_matches(name, known, n=_SUGGESTIONS)
    hint = f" (did you mean {_either(close)}?)" if close else ""
    return (
        f"{name!r} is not a time zone of the IANA time zone database{hint}; use a name such "
        "as Europe/Berlin or UTC (`timedatectl list-timezones` lists them)"
    )


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

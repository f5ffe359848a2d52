"""The Nomad task environment as two guest files: a shell profile and a systemd EnvironmentFile.

``/etc/profile.d/nomad-env.sh`` is sourced by login shells (``export NAME='value'``, quoted
with ``shlex.quote``). ``/etc/nomad-env`` is for ``EnvironmentFile=`` in the user's units and
for ``set -a; . /etc/nomad-env``: one quoting serves both readers, a double-quoted value in
which only ``"``, ``\\``, `````, ``$`` are backslash-escaped and newlines stand verbatim.
systemd.exec(5) (EnvironmentFile=) and POSIX sh both read exactly that back, multi-line values
included.

What cannot be represented is not silently mangled: a name that is not a shell identifier
(Nomad also exports such names, e.g. ``NOMAD_META_my-key``, next to a cleaned copy) is left
out and reported as a warning; a value that no environment variable can hold (NUL) or that
systemd refuses to read (U+FEFF, Unicode noncharacters, unpaired surrogates) is a ConfigError
naming the variable.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from nomad_vm.errors import ConfigError

PROFILE_PATH = "/etc/profile.d/nomad-env.sh"
ENV_FILE_PATH = "/etc/nomad-env"

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Variables that describe the host process's session, not the task: exported into the
# guest they would replace the login's own (a HOME that does not exist, a host PATH).
SESSION_VARIABLES = frozenset(
    {"HOME", "PATH", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "IFS", "TMPDIR"}
)

_HEADER = "# The Nomad task environment (NOMAD_* and the job's env), written by nomad-vm.\n"
_DOUBLE_QUOTE_ESCAPES = str.maketrans({c: "\\" + c for c in '\\"`$'})


@dataclass(frozen=True)
class EnvFiles:
    profile: str
    env_file: str
    skipped: tuple[str, ...]  # human-readable, for a task event; names only, never values


def _unrepresentable(value: str) -> str | None:
    """Why ``value`` cannot be an environment variable in the guest, or None."""
    for ch in value:
        code = ord(ch)
        if code == 0:
            return "contains a NUL character, which no environment variable can hold"
        if 0xD800 <= code <= 0xDFFF:
            return "is not valid Unicode (an unpaired surrogate)"
        if code == 0xFEFF or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            # systemd reads EnvironmentFile= as UTF-8 without noncharacters and BOMs.
            return f"contains U+{code:04X}, which systemd does not accept in an environment file"
    return None


def env_file_value(value: str) -> str:
    """``value`` double-quoted for systemd's EnvironmentFile= and POSIX sh alike."""
    return '"' + value.translate(_DOUBLE_QUOTE_ESCAPES) + '"'


def environment_files(env: Mapping[str, str]) -> EnvFiles:
    """Both files for ``env``, in name order (stable output for the same task environment)."""
    profile = [_HEADER]
    env_file = [_HEADER]
    skipped: list[str] = []
    for name in sorted(env):
        value = env[name]
        if not NAME.match(name):
            skipped.append(f"{name} (not a shell variable name)")
            continue
        if name in SESSION_VARIABLES:
            skipped.append(f"{name} (the guest's login sets its own)")
            continue
        reason = _unrepresentable(value)
        if reason is not None:
            raise ConfigError(f"env.{name}", reason)
        profile.append(f"export {name}={shlex.quote(value)}\n")
        env_file.append(f"{name}={env_file_value(value)}\n")
    return EnvFiles("".join(profile), "".join(env_file), tuple(skipped))

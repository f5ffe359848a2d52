"""The image allowlist: which host files a task may hand to the VMM.

A path is allowed when, after resolving symlinks and ``..``, it lies inside one of the allowed
directories (also resolved), and inside none of the private ones. Checking the unresolved
string would let ``/allowed/../etc/shadow`` or a symlink planted in an allowed directory escape.

Private directories hold the plugin's own state (its ``data_dir``: leases, task journals,
other tasks' disks and seed ISOs in long-path runtime dirs; the runtime dirs inside allocation
directories). They are refused even when an allowed directory contains them, so no allowlist,
however wide, lets one job boot or read another's files.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from nomad_vm.errors import ImageError


@dataclass(frozen=True)
class Allowlist:
    """Directories files may come from (``roots``), minus the plugin's own state (``private``).

    ``private`` holds absolute glob patterns of directories (``*`` matches within one path
    component); a file inside a directory that matches one is refused. Build them with
    ``private_dir``/``private_pattern`` so that the literal part is resolved and escaped.
    """

    roots: tuple[str, ...]
    private: tuple[str, ...] = ()

    def root_paths(self) -> list[Path]:
        return [Path(d).resolve() for d in self.roots if d]

    def private_match(self, resolved: Path) -> str | None:
        """The private pattern ``resolved`` lies inside (or is), else None."""
        for pattern in self.private:
            if any(p.match(pattern) for p in (resolved, *resolved.parents)):
                return pattern
        return None


# What the path checks take: an Allowlist, or plain directories (nothing private).
AllowedDirs = Allowlist | Sequence[str]


def private_dir(path: str | Path) -> str:
    """The pattern for directory ``path`` itself (resolved; glob characters escaped)."""
    return glob.escape(str(Path(path).resolve()))


def private_pattern(base: str | Path, *components: str) -> str:
    """The pattern ``<base resolved>/<components...>``: ``base`` is taken literally, the
    components may use ``*`` (e.g. every ``nomad-vm-*`` runtime dir one level below)."""
    return str(PurePath(private_dir(base), *components))


def as_allowlist(allowed: AllowedDirs) -> Allowlist:
    """``allowed`` as an Allowlist (plain directories have nothing private)."""
    return allowed if isinstance(allowed, Allowlist) else Allowlist(tuple(allowed))


def resolve_allowed_file(field: str, value: str, allowed_dirs: AllowedDirs, base: str) -> Path:
    """Return the resolved path of ``value`` if it is a readable file inside ``allowed_dirs``.

    Relative paths are taken relative to ``base`` (the task directory, like Nomad's own drivers).
    ``field`` names the task option in errors.
    """
    candidate = Path(value) if os.path.isabs(value) else Path(base) / value
    resolved = resolve_within(
        field,
        candidate,
        allowed_dirs,
        subject=value,
        advice="add its directory to the plugin's image_paths",
    )
    if not os.access(resolved, os.R_OK):
        raise ImageError(field, f"{value}: not readable by the plugin")
    return resolved


def resolve_within(
    field: str,
    candidate: Path,
    allowed_dirs: AllowedDirs,
    *,
    subject: str,
    advice: str,
    regular: bool = True,
) -> Path:
    """``candidate`` resolved (symlinks, ``..``), if it is a regular file inside ``allowed_dirs``
    and not inside one of its private directories (``regular=False``: whatever it is; the
    caller checks what it opens).

    ``subject`` starts every error message (what the user gave, or what referred to the file);
    ``advice`` ends the "outside" error with what to do about it.
    """
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ImageError(field, f"{subject}: no such file") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ImageError(field, f"{subject}: cannot resolve the path: {exc}") from None
    check_real_path(field, resolved, allowed_dirs, subject=subject, advice=advice)
    if regular and not resolved.is_file():
        raise ImageError(field, f"{subject}: not a regular file")
    return resolved


def check_real_path(
    field: str, resolved: Path, allowed_dirs: AllowedDirs, *, subject: str, advice: str
) -> None:
    """Refuse ``resolved`` (a path with no symlink or ``..`` left, such as the kernel's name
    for an open descriptor) unless it lies inside ``allowed_dirs`` and outside their private
    directories. ``subject`` and ``advice`` as for ``resolve_within``."""
    allowlist = as_allowlist(allowed_dirs)
    private = allowlist.private_match(resolved)
    if private is not None:
        raise ImageError(
            field,
            f"{subject} resolves to {resolved}, which is part of the VM driver's own state "
            f"({private}: leases, task journals and other tasks' disks and cloud-init seeds); "
            "a job may only name files in the plugin's image_paths or in its own allocation "
            "directory",
        )
    roots = allowlist.root_paths()
    if not any(resolved == root or root in resolved.parents for root in roots):
        listed = ", ".join(str(r) for r in roots) or "(none)"
        raise ImageError(
            field,
            f"{subject} resolves to {resolved}, which is outside the allowed directories "
            f"({listed}); {advice}",
        )

"""The image allowlist: which host files a task may hand to the VMM.

A path is allowed when, after resolving symlinks and ``..``, it lies inside one of the allowed
directories (also resolved). Checking the unresolved string would let ``/allowed/../etc/shadow``
or a symlink planted in an allowed directory escape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nomad_vm.errors import ImageError


def resolve_allowed_file(field: str, value: str, allowed_dirs: Iterable[str], base: str) -> Path:
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
    field: str, candidate: Path, allowed_dirs: Iterable[str], *, subject: str, advice: str
) -> Path:
    """``candidate`` resolved (symlinks, ``..``), if it is a regular file inside ``allowed_dirs``.

    ``subject`` starts every error message (what the user gave, or what referred to the file);
    ``advice`` ends the "outside" error with what to do about it.
    """
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ImageError(field, f"{subject}: no such file") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ImageError(field, f"{subject}: cannot resolve the path: {exc}") from None
    roots = [Path(d).resolve() for d in allowed_dirs if d]
    if not any(resolved == root or root in resolved.parents for root in roots):
        listed = ", ".join(str(r) for r in roots) or "(none)"
        raise ImageError(
            field,
            f"{subject} resolves to {resolved}, which is outside the allowed directories "
            f"({listed}); {advice}",
        )
    if not resolved.is_file():
        raise ImageError(field, f"{subject}: not a regular file")
    return resolved

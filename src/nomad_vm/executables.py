"""Finding the programs the driver runs (QEMU, qemu-img, virtiofsd, dnsmasq): one rule for
paths and names, and errors that say what to install or configure."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from nomad_vm.errors import HypervisorError


def find_executable(
    configured: str | None,
    default: str,
    label: str,
    hint: str,
    fallbacks: Sequence[str | Path] = (),
) -> Path:
    """``configured`` (a path, or a name looked up on PATH), else ``default`` on PATH, else the
    first executable of ``fallbacks``: where distributions put programs that are not on a
    service's PATH (``/usr/sbin``, ``/usr/libexec``). HypervisorError naming ``label`` and
    saying ``hint`` when there is none."""
    # An empty string is what an unset optional HCL attribute decodes to: treat it as unset.
    name = configured.strip() if configured and configured.strip() else default
    subject = f"{label} {name!r}" if name != default else name
    if os.sep not in name:
        found = shutil.which(name)
        if found is None and name == default:
            found = next((str(f) for f in fallbacks if os.access(f, os.X_OK)), None)
        if found is None:
            raise HypervisorError(f"{subject} not found on PATH; {hint}")
        return Path(found).absolute()
    path = Path(name).absolute()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise HypervisorError(f"{subject} does not exist; {hint}") from exc
    except OSError as exc:
        raise HypervisorError(f"{subject}: cannot stat: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise HypervisorError(f"{subject} is not a regular file")
    if not os.access(path, os.X_OK):
        raise HypervisorError(f"{subject} is not executable")
    return path

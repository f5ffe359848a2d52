"""Boot firmware for QEMU guests: which OVMF build to use, and each task's own variable store.

``bios`` is QEMU's built-in SeaBIOS and needs nothing here. ``uefi`` and ``uefi-secure`` use
OVMF, found the way libvirt finds it: through QEMU's firmware descriptors (JSON files described
in QEMU's ``docs/interop/firmware.json``; Debian's ``ovmf`` package installs them in
``/usr/share/qemu/firmware``). Only when no descriptor fits do we fall back to the file names of
Debian bookworm's ``ovmf`` package.

OVMF comes as two flash images: CODE (read-only, shared by every VM) and a VARS *template*. The
variable store is the guest's NVRAM (boot entries, Secure Boot keys and state), which the guest
writes, so every task gets its own copy (``prepare_vars``); the template is never opened for
writing.

Secure Boot caveat (Debian 12's OVMF, edk2 2022.11): with direct kernel boot (``-kernel``) OVMF
first loads the kernel as a verified EFI image, and when verification fails falls back to its
legacy Linux loader, which does not verify anything. Secure Boot is on for the guest
(``SecureBoot`` = 1, the kernel locks down), but the ``-kernel`` image itself is not checked.
Images the firmware loads from disks are checked (and refused with "Access Denied"). Newer edk2
can switch that fallback off (fw_cfg ``opt/org.tianocore/EnableLegacyLoader=no``); this build
ignores the switch (tried by hand: an unsigned kernel still booted with it). The enforcement for
disk boots is what tests/integration/test_firmware_boot.py proves.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomad_vm.errors import HypervisorError, VMRequestError
from nomad_vm.files import write_atomically

log = logging.getLogger(__name__)

BIOS = "bios"
UEFI = "uefi"
UEFI_SECURE = "uefi-secure"
FIRMWARE_KINDS = (BIOS, UEFI, UEFI_SECURE)

ARCH = "x86_64"
OVMF_PACKAGE = "ovmf"

# Lowest priority first: a descriptor in /etc replaces the one with the same file name in
# /usr/share (an empty one hides it), as QEMU's firmware.json specifies. The per-user directory
# of that spec is left out: the plugin runs as a system service.
DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))

# Machine families each kind must run on. Descriptors list globs of versioned machine names
# ("pc-q35-*"); "latest" stands for the unversioned alias (q35 = the newest pc-q35-X.Y).
_FAMILIES = {UEFI: ("pc-i440fx", "pc-q35"), UEFI_SECURE: ("pc-q35",)}

# Debian bookworm's file names, for hosts without descriptors.
_OVMF_DIR = Path("/usr/share/OVMF")
_DEBIAN_FILES = {
    UEFI: ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    # The secboot build requires SMM (its variable store is only writable from SMM, so the guest
    # OS cannot rewrite the Secure Boot keys); the .ms VARS has Secure Boot already enabled with
    # Debian's PK and Microsoft's KEK/db.
    UEFI_SECURE: ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
}

VARS_FILE = "uefi-vars.fd"


@dataclass(frozen=True)
class FirmwarePlan:
    """The OVMF files for one firmware kind, and what the machine must provide for them."""

    kind: str
    code: Path
    vars_template: Path
    secure: bool
    requires_smm: bool
    # Where the choice came from (a descriptor path, or the Debian fallback): for messages.
    source: str


@dataclass(frozen=True)
class _Descriptor:
    path: Path
    code: Path
    vars_template: Path
    features: frozenset[str]
    machines: tuple[str, ...]  # globs of versioned machine names, e.g. "pc-q35-*"


def plan_firmware(
    kind: str, *, descriptor_dirs: tuple[Path, ...] = DESCRIPTOR_DIRS
) -> FirmwarePlan | None:
    """The firmware files for ``kind``; None for ``bios`` (QEMU's built-in SeaBIOS).

    Raises VMRequestError for an unknown kind, HypervisorError when OVMF is not installed.
    """
    if kind == BIOS:
        return None
    if kind not in _FAMILIES:
        raise VMRequestError(
            "firmware", f"unknown firmware {kind!r}; use one of {', '.join(FIRMWARE_KINDS)}"
        )
    for descriptor in _descriptors(descriptor_dirs):
        if _fits(descriptor, kind):
            return FirmwarePlan(
                kind=kind,
                code=descriptor.code,
                vars_template=descriptor.vars_template,
                secure=kind == UEFI_SECURE,
                requires_smm="requires-smm" in descriptor.features,
                source=str(descriptor.path),
            )
    return _debian_fallback(kind)


def _fits(descriptor: _Descriptor, kind: str) -> bool:
    runs_on = all(
        any(fnmatch.fnmatchcase(f"{family}-latest", glob) for glob in descriptor.machines)
        for family in _FAMILIES[kind]
    )
    features = descriptor.features
    if kind == UEFI_SECURE:
        # Secure Boot that is on from the first boot (enrolled keys), and backed by SMM: without
        # SMM the guest OS could rewrite the keys, and Secure Boot would promise nothing.
        return runs_on and {"secure-boot", "enrolled-keys", "requires-smm"} <= features
    # Plain UEFI runs on pc, and on q35 with smm=off (ACPI power button under TCG): no build that
    # needs SMM, and none that turns Secure Boot on.
    return runs_on and not features & {"requires-smm", "enrolled-keys"}


def _descriptors(dirs: tuple[Path, ...]) -> list[_Descriptor]:
    """Usable x86_64 flash descriptors, in priority order (file name order, as QEMU's spec)."""
    by_name: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            by_name[path.name] = path
    found = []
    for name in sorted(by_name):
        descriptor = _read_descriptor(by_name[name])
        if descriptor is not None:
            found.append(descriptor)
    return found


def _read_descriptor(path: Path) -> _Descriptor | None:
    """One descriptor, or None if it is empty (masked), unreadable or not one we can use."""
    try:
        text = path.read_text()
        data = json.loads(text) if text.strip() else None
    except (OSError, ValueError) as exc:
        log.warning("ignoring firmware descriptor %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or "uefi" not in data.get("interface-types", []):
        return None
    mapping = data.get("mapping", {})
    # Only split flash images in raw format: that is what our -drive if=pflash lines say.
    if mapping.get("device") != "flash" or mapping.get("mode", "split") != "split":
        return None
    code, template = mapping.get("executable", {}), mapping.get("nvram-template", {})
    if any(part.get("format") != "raw" or "filename" not in part for part in (code, template)):
        return None
    machines = _x86_64_machines(data.get("targets", []))
    if machines is None:
        return None
    descriptor = _Descriptor(
        path=path,
        code=Path(code["filename"]),
        vars_template=Path(template["filename"]),
        features=frozenset(str(feature) for feature in data.get("features", [])),
        machines=machines,
    )
    if not (descriptor.code.is_file() and descriptor.vars_template.is_file()):
        log.warning("firmware descriptor %s names files that are missing", path)
        return None
    return descriptor


def _x86_64_machines(targets: Any) -> tuple[str, ...] | None:
    """The machine globs of the x86_64 target, or None if the firmware is for another arch."""
    for target in targets if isinstance(targets, list) else []:
        if isinstance(target, dict) and target.get("architecture") == ARCH:
            return tuple(str(glob) for glob in target.get("machines", []))
    return None


def _debian_fallback(kind: str) -> FirmwarePlan:
    """Debian bookworm's file names, used when no descriptor fits (or none is installed)."""
    code_name, vars_name = _DEBIAN_FILES[kind]
    code, template = _OVMF_DIR / code_name, _OVMF_DIR / vars_name
    missing = [str(path) for path in (code, template) if not path.is_file()]
    if missing:
        raise HypervisorError(
            f"firmware {kind!r} needs OVMF, which is not installed: no QEMU firmware descriptor "
            f"fits and {', '.join(missing)} is missing (install the Debian package "
            f"'{OVMF_PACKAGE}')"
        )
    return FirmwarePlan(
        kind=kind,
        code=code,
        vars_template=template,
        secure=kind == UEFI_SECURE,
        requires_smm=kind == UEFI_SECURE,
        source=f"{_OVMF_DIR} (Debian {OVMF_PACKAGE} file names)",
    )


def prepare_vars(plan: FirmwarePlan, dest_dir: Path) -> Path:
    """The task's own variable store in ``dest_dir``, copied from the plan's template (0600).

    An existing copy of the template's size is kept, like a machine's NVRAM across reboots:
    a restarted task finds its boot entries and enrolled keys again. A copy of another size
    (the template changed with an ovmf upgrade, or a half-written file) is replaced, because
    QEMU refuses a flash image whose size does not match the firmware.
    """
    dest = dest_dir / VARS_FILE
    try:
        size = plan.vars_template.stat().st_size
        if dest.is_file() and dest.stat().st_size == size:
            os.chmod(dest, 0o600)
            return dest
        # Read-only from the shared template; the copy is 0600 (it holds the guest's boot
        # configuration) and never seen half-written.
        write_atomically(dest, plan.vars_template.read_bytes())
    except OSError as exc:
        raise HypervisorError(
            f"cannot create the UEFI variable store {dest} from {plan.vars_template}: {exc}"
        ) from exc
    return dest

"""The "tiny" test guest: Debian's kernel booted as a PVH ``vmlinux`` plus a busybox initramfs.

Cache layout under ``cache_dir``::

    debs/                  downloaded .debs (one version per package is kept)
    tiny/vmlinux           uncompressed ELF kernel for ``qemu -kernel`` (PVH entry)
    tiny/vmlinuz           the package's bzImage as shipped (EFI stub, Debian's signature):
                           what UEFI firmware boots, as OVMF cannot start a PVH ELF
    tiny/initramfs.img     uncompressed newc cpio: busybox, /init, modules
    tiny/manifest.json     the inputs the outputs were built from; written last
    tiny/.lock             serialises concurrent builds (flock)

The guest's console protocol is documented at the top of ``tiny-init.sh``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomad_vm.errors import GuestBuildError
from nomad_vm.guests import debian_packages
from nomad_vm.guests.cache import build_or_reuse, describe, publish, read_manifest
from nomad_vm.guests.debian_packages import DebPackage
from nomad_vm.guests.initramfs import stage_tree, write_cpio
from nomad_vm.guests.kernel import collect_modules, extract_vmlinux

log = logging.getLogger(__name__)

# Bump whenever the build's output changes for the same packages (layout, init protocol, ...).
FORMAT_VERSION = 2

BUSYBOX_PACKAGE = "busybox-static"

# button+evdev: the ACPI power button reaches /init as an input event (graceful stop).
# virtio_pci+virtio_console: virtio-serial ports (guest agent, console channels). Their
# dependencies (virtio, virtio_ring, ...) are added by the build from modinfo.
TINY_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",  # the task's disk, for the storage tests
    "virtio_balloon",  # guest memory statistics for TaskStats
    "pvpanic_mmio",  # tells QEMU when the kernel panics (QEMU's ISA pvpanic is ACPI-enumerated)
    "evdev",
    "button",
    "virtio_net",  # the NIC of the networking tests (nomadvm.dhcp=1)
)

# quiet: serial output under TCG is slow and the tests read only /init's lines.
# no_timer_check: avoids "IO-APIC + timer doesn't work!" panics when many guests boot at once.
# panic=-1: reboot at once on panic; with QEMU's -no-reboot that ends QEMU instead of hanging.
DEFAULT_CMDLINE = "console=ttyS0 quiet no_timer_check panic=-1"

RUN_PARAMETER = "nomadvm.run"
# x86's COMMAND_LINE_SIZE is 2048 bytes including the terminating NUL.
MAX_CMDLINE_BYTES = 2047

INIT_SCRIPT = "tiny-init.sh"
VMLINUX = "vmlinux"
VMLINUZ = "vmlinuz"
INITRAMFS = "initramfs.img"


# Default of TinyGuest.vmlinuz: "next to vmlinux", the cache layout.
_BESIDE_VMLINUX = Path()


@dataclass(frozen=True)
class TinyGuest:
    """A built tiny guest: boot it with ``-kernel vmlinux -initrd initramfs -append cmdline``
    (with UEFI firmware: ``-kernel vmlinuz``)."""

    vmlinux: Path
    initramfs: Path
    kernel_version: str  # the kernel release, e.g. "6.1.0-56-amd64"
    cmdline: str = DEFAULT_CMDLINE
    # Last and defaulted so that TinyGuest(vmlinux, initramfs, release) keeps working.
    vmlinuz: Path = _BESIDE_VMLINUX

    def __post_init__(self) -> None:
        if self.vmlinuz == _BESIDE_VMLINUX:
            object.__setattr__(self, "vmlinuz", self.vmlinux.with_name(VMLINUZ))


@dataclass(frozen=True)
class TinyInputs:
    """Everything the outputs depend on; a change in any field means a rebuild."""

    kernel: DebPackage
    busybox: DebPackage
    init_sha256: str
    modules: tuple[str, ...] = TINY_MODULES
    format_version: int = FORMAT_VERSION

    def key(self) -> dict[str, Any]:
        """The JSON-ready form stored in (and compared against) the manifest."""
        return {
            "format_version": self.format_version,
            "kernel_package": self.kernel.name,
            "kernel_package_version": self.kernel.version,
            "busybox_package": self.busybox.name,
            "busybox_package_version": self.busybox.version,
            "init_sha256": self.init_sha256,
            "modules": list(self.modules),
        }

    def digest(self) -> str:
        canonical = json.dumps(self.key(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def init_script() -> bytes:
    """The guest's /init, shipped as package data next to this module."""
    return importlib.resources.files("nomad_vm.guests").joinpath(INIT_SCRIPT).read_bytes()


def tiny_inputs() -> TinyInputs:
    """Look up the current package versions (apt-cache only, no download)."""
    fields = debian_packages.candidates([debian_packages.KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
    return TinyInputs(
        kernel=debian_packages.kernel_package(fields[debian_packages.KERNEL_METAPACKAGE]),
        busybox=DebPackage(BUSYBOX_PACKAGE, fields[BUSYBOX_PACKAGE]["Version"]),
        init_sha256=hashlib.sha256(init_script()).hexdigest(),
    )


def tiny_cmdline(base: str, run: str | None) -> str:
    """``base`` plus ``nomadvm.run=<base64 of run>`` when a command is given.

    Base64 keeps spaces, quotes and newlines of the shell command out of the kernel's own
    argument parsing. If ``base`` already has a ``nomadvm.run``, the appended one wins.
    """
    if run is None:
        return base
    encoded = base64.b64encode(run.encode()).decode("ascii")
    cmdline = f"{base} {RUN_PARAMETER}={encoded}".strip()
    if len(cmdline.encode()) > MAX_CMDLINE_BYTES:
        raise GuestBuildError(
            f"kernel command line would be {len(cmdline.encode())} bytes, over the x86 limit of "
            f"{MAX_CMDLINE_BYTES}; pass a shorter command (e.g. a script on a shared disk)"
        )
    return cmdline


def _guest_from_manifest(tiny_dir: Path, manifest: dict[str, Any]) -> TinyGuest | None:
    """The guest a manifest describes, if its files are still there with the recorded sizes."""
    files = manifest.get("files", {})
    # A format-1 build has no vmlinuz; it is only used when apt cannot be asked (otherwise the
    # format bump rebuilds it), and then guest.vmlinuz names a missing file.
    names = (VMLINUX, INITRAMFS, VMLINUZ) if VMLINUZ in files else (VMLINUX, INITRAMFS)
    for name in names:
        path = tiny_dir / name
        recorded = files.get(name, {}).get("size") if isinstance(files, dict) else None
        if not path.is_file() or path.stat().st_size != recorded:
            return None
    return TinyGuest(
        vmlinux=tiny_dir / VMLINUX,
        initramfs=tiny_dir / INITRAMFS,
        kernel_version=str(manifest.get("kernel_version", "")),
    )


def cached_tiny(cache_dir: Path) -> TinyGuest | None:
    """The last complete build in ``cache_dir``, without asking apt whether it is current."""
    tiny_dir = cache_dir / "tiny"
    manifest = read_manifest(tiny_dir)
    return None if manifest is None else _guest_from_manifest(tiny_dir, manifest)


def build_tiny(cache_dir: Path, *, force: bool = False) -> TinyGuest:
    """Build the tiny guest into ``cache_dir`` unless an up-to-date build is already there.

    Up to date means the manifest's inputs equal the current ones (package versions from apt,
    init script hash, module list, FORMAT_VERSION). If apt cannot be asked (no apt, broken
    lists) an existing build is used with a warning rather than failing.
    """
    tiny_dir = cache_dir / "tiny"
    return build_or_reuse(
        tiny_dir,
        label="tiny",
        force=force,
        current_inputs=tiny_inputs,
        from_manifest=_guest_from_manifest,
        build=lambda inputs: _build(cache_dir, tiny_dir, inputs),
    )


def _build(cache_dir: Path, tiny_dir: Path, inputs: TinyInputs) -> TinyGuest:
    started = time.monotonic()
    release = debian_packages.kernel_release(inputs.kernel)
    log.info(
        "building tiny guest: kernel %s %s, busybox %s",
        inputs.kernel.name,
        inputs.kernel.version,
        inputs.busybox.version,
    )
    kernel_deb, busybox_deb = debian_packages.download(
        [inputs.kernel, inputs.busybox], cache_dir / "debs"
    )
    # Leftovers of a build that was killed; safe to remove because we hold the lock.
    for stale in tiny_dir.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # The scratch directory sits next to the outputs so the final renames stay on one file
    # system (atomic), and the ~400 MB kernel tree does not land in a small /tmp.
    with tempfile.TemporaryDirectory(dir=tiny_dir, prefix=".build-") as scratch_name:
        scratch = Path(scratch_name)
        debian_packages.extract(kernel_deb, scratch / "kernel")
        debian_packages.extract(busybox_deb, scratch / "busybox")
        vmlinux, initramfs = scratch / VMLINUX, scratch / INITRAMFS

        vmlinuz = scratch / "kernel" / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.is_file():
            raise GuestBuildError(f"{kernel_deb.name} has no boot/vmlinuz-{release}")
        vmlinux.write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        os.replace(vmlinuz, scratch / VMLINUZ)

        modules_dir = scratch / "kernel" / "lib" / "modules" / release
        modules = collect_modules(modules_dir, inputs.modules, release)
        busybox = scratch / "busybox" / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestBuildError(f"{busybox_deb.name} has no bin/busybox")
        stage_tree(scratch / "root", busybox=busybox, init_script=init_script(), modules=modules)
        write_cpio(scratch / "root", initramfs)

        manifest = {
            "inputs": inputs.key(),
            "cache_key": inputs.digest(),
            "kernel_version": release,
            "modules_loaded": [module.name for module in modules],
            "files": {name: describe(scratch / name) for name in (VMLINUX, VMLINUZ, INITRAMFS)},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        outputs = {VMLINUX: vmlinux, VMLINUZ: scratch / VMLINUZ, INITRAMFS: initramfs}
        publish(tiny_dir, outputs, manifest, scratch)
    log.info("tiny guest built in %.1f s", time.monotonic() - started)
    return TinyGuest(
        vmlinux=tiny_dir / VMLINUX, initramfs=tiny_dir / INITRAMFS, kernel_version=release
    )

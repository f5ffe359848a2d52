"""The Debian cloud guest: bookworm with systemd, cloud-init, qemu-guest-agent and ssh.

Built from Debian packages by debootstrap and apt (needs root), trimmed for boot under TCG
(docs/test-guests.md), and bootable both ways the driver supports: direct kernel boot with
``vmlinux``/``vmlinuz`` + ``initrd.img`` + ``cmdline`` and the disk as root, or from the disk
alone (extlinux in the ext4 file system's boot sector).

Cache layout under ``cache_dir``::

    debs/debootstrap/      .debs debootstrap fetched (only those of the last build are kept)
    debian/disk.qcow2      ext4 root file system, label "root", no partition table
    debian/vmlinux         the guest kernel as PVH-bootable ELF (fast ``-kernel`` boot)
    debian/vmlinuz         the same kernel as bzImage (UEFI firmware needs this form)
    debian/initrd.img      initramfs-tools image with only virtio-pci, virtio-blk and ext4
    debian/build.log       output of debootstrap, apt and the image tools of the last build
    debian/manifest.json   inputs, package versions, default cmdline; written last
    debian/.lock           serialises concurrent builds (flock)

Never boot ``disk.qcow2`` read-write: put a throwaway overlay on it (``qemu-img create -b``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomad_vm.errors import GuestBuildError
from nomad_vm.guests import debian_packages, debian_rootfs
from nomad_vm.guests.cache import build_or_reuse, describe, publish, read_manifest
from nomad_vm.guests.debian_disk import DISK_SIZE, make_disk
from nomad_vm.guests.debian_packages import KERNEL_METAPACKAGE, DebPackage
from nomad_vm.guests.debian_sources import GuestSources, guest_sources, host_sources
from nomad_vm.guests.kernel import extract_vmlinux

log = logging.getLogger(__name__)

# Bump whenever the build's output changes for the same packages (layout, trimming, ...).
FORMAT_VERSION = 2
SUITE = "bookworm"
# The set from docs/test-guests.md. debootstrap resolves neither virtual packages nor
# Recommends: python3-cffi-backend (virtual dependency of cloud-init's python3-cryptography
# stack), udev and dbus must be named or the system ends up half-configured.
PACKAGES = (
    "python3-cffi-backend",
    KERNEL_METAPACKAGE,
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "qemu-guest-agent",
    "openssh-server",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "python3",
    "sudo",
    "e2fsprogs",
    "kmod",
    "initramfs-tools",
    "netbase",
    "procps",
)
# ro: the initramfs checks the root file system before systemd remounts it read-write.
# no_timer_check: skips the IO-APIC timer check that misfires when TCG guests boot in parallel.
# panic=-1: reboot at once on a kernel panic, which ends QEMU when run with -no-reboot.
DEFAULT_CMDLINE = "root=LABEL=root ro console=ttyS0 no_timer_check panic=-1"
# zlib-compressed clusters: 236 instead of 720 MiB, and no boot time difference measurable under
# TCG (decompressing what the guest reads is cheap next to emulating it). Costs ~25 CPU-s to build.
COMPRESS_DISK = True

DISK = "disk.qcow2"
VMLINUX = "vmlinux"
VMLINUZ = "vmlinuz"
INITRD = "initrd.img"
BUILD_LOG = "build.log"
_OUTPUTS = (DISK, VMLINUX, VMLINUZ, INITRD)


@dataclass(frozen=True)
class DebianGuest:
    """A built Debian guest. Boot it with ``-kernel vmlinux -initrd initrd -append cmdline``
    and ``disk`` (through an overlay) as a virtio disk, or from ``disk`` alone."""

    disk: Path
    vmlinux: Path
    vmlinuz: Path
    initrd: Path
    cmdline: str
    kernel_version: str  # the kernel release, e.g. "6.1.0-56-amd64"


@dataclass(frozen=True)
class DebianInputs:
    """Everything the outputs depend on; a change in any field means a rebuild."""

    versions: tuple[tuple[str, str], ...]  # apt's candidate version of every listed package
    kernel: DebPackage  # the versioned image package the kernel metapackage points at
    script_sha256: str
    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    cmdline: str = DEFAULT_CMDLINE
    disk_size: str = DISK_SIZE
    compress: bool = COMPRESS_DISK
    format_version: int = FORMAT_VERSION

    def key(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "suite": self.suite,
            "packages": list(self.packages),
            "versions": dict(self.versions),
            "kernel": {"name": self.kernel.name, "version": self.kernel.version},
            "customize_sha256": self.script_sha256,
            "cmdline": self.cmdline,
            "disk_size": self.disk_size,
            "compress": self.compress,
        }

    def digest(self) -> str:
        canonical = json.dumps(self.key(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def metapackage_version(self) -> str:
        return dict(self.versions)[KERNEL_METAPACKAGE]


def debian_inputs() -> DebianInputs:
    """Ask apt for the current candidate versions (one apt-cache call; no download)."""
    fields = debian_packages.candidates(list(PACKAGES))
    return DebianInputs(
        versions=tuple(sorted((name, fields[name]["Version"]) for name in PACKAGES)),
        kernel=debian_packages.kernel_package(fields[KERNEL_METAPACKAGE]),
        script_sha256=hashlib.sha256(debian_rootfs.customize_script()).hexdigest(),
    )


def _guest_from_manifest(debian_dir: Path, manifest: dict[str, Any]) -> DebianGuest | None:
    """The guest a manifest describes, if its files are still there with the recorded sizes."""
    files = manifest.get("files", {})
    for name in _OUTPUTS:
        path = debian_dir / name
        recorded = files.get(name, {}).get("size") if isinstance(files, dict) else None
        if not path.is_file() or path.stat().st_size != recorded:
            return None
    return DebianGuest(
        disk=debian_dir / DISK,
        vmlinux=debian_dir / VMLINUX,
        vmlinuz=debian_dir / VMLINUZ,
        initrd=debian_dir / INITRD,
        cmdline=str(manifest.get("cmdline", DEFAULT_CMDLINE)),
        kernel_version=str(manifest.get("kernel_version", "")),
    )


def cached_debian(cache_dir: Path) -> DebianGuest | None:
    """The last complete build in ``cache_dir``, without asking apt whether it is current."""
    debian_dir = cache_dir / "debian"
    manifest = read_manifest(debian_dir)
    return None if manifest is None else _guest_from_manifest(debian_dir, manifest)


def build_debian(cache_dir: Path, *, force: bool = False) -> DebianGuest:
    """Build the Debian guest into ``cache_dir`` unless an up-to-date build is already there.

    Up to date means the manifest's inputs equal the current ones (apt's candidate versions of
    the packages, the customisation script, cmdline, FORMAT_VERSION). If apt cannot be asked,
    an existing build is used with a warning rather than failing. Building takes minutes and
    needs root and the host's Debian mirror.
    """
    debian_dir = cache_dir / "debian"
    return build_or_reuse(
        debian_dir,
        label="Debian",
        force=force,
        current_inputs=debian_inputs,
        from_manifest=_guest_from_manifest,
        build=lambda inputs: _build(cache_dir, debian_dir, inputs),
    )


def _build(cache_dir: Path, debian_dir: Path, inputs: DebianInputs) -> DebianGuest:
    debian_rootfs.require_root()
    started = time.monotonic()
    sources = guest_sources(host_sources(), inputs.suite)
    log.info("building Debian guest from %s: kernel %s", sources.mirror, inputs.kernel.spec)
    # Leftovers of a killed build; safe to remove because we hold the lock.
    for stale in debian_dir.glob(".build-*"):
        debian_rootfs.remove_tree(stale)
    # Scratch next to the outputs: the final renames stay on one file system (atomic), and the
    # ~1 GB tree and the multi-GB sparse raw image do not land in a small /tmp.
    scratch = Path(tempfile.mkdtemp(dir=debian_dir, prefix=".build-"))
    # The log is written in place (not published) so that it outlives a failed build.
    build_log = debian_dir / BUILD_LOG
    build_log.write_text(f"nomad-vm Debian guest build, inputs {inputs.digest()}\n")
    try:
        manifest = _assemble(cache_dir, scratch, inputs, sources, build_log)
        manifest["build_seconds"] = round(time.monotonic() - started, 1)
        publish(debian_dir, {name: scratch / name for name in _OUTPUTS}, manifest, scratch)
    finally:
        debian_rootfs.remove_tree(scratch)
    log.info("Debian guest built in %.1f s", time.monotonic() - started)
    guest = _guest_from_manifest(debian_dir, manifest)
    if guest is None:
        raise GuestBuildError(f"the Debian guest in {debian_dir} changed while it was published")
    return guest


def _assemble(
    cache_dir: Path, scratch: Path, inputs: DebianInputs, sources: GuestSources, build_log: Path
) -> dict[str, Any]:
    """Make every output in ``scratch``; return the manifest that describes them."""
    tree = scratch / "root"
    debian_rootfs.debootstrap(
        tree,
        suite=inputs.suite,
        mirror=sources.mirror,
        # The kernel comes later, from the customisation script: its initramfs must be built
        # after our initramfs-tools settings are in place.
        packages=[name for name in inputs.packages if name != KERNEL_METAPACKAGE],
        cache=cache_dir / "debs" / "debootstrap",
        log=build_log,
    )
    debian_rootfs.customize(
        tree,
        sources_list=sources.sources_list(),
        kernel_version=inputs.metapackage_version,
        log=build_log,
    )
    release = debian_packages.kernel_release(inputs.kernel)
    _extract_boot_files(tree, release, scratch)
    installed = debian_rootfs.installed_versions(tree, [*inputs.packages, inputs.kernel.name])
    make_disk(tree, scratch / DISK, cmdline=inputs.cmdline, compress=inputs.compress, log=build_log)
    return {
        "inputs": inputs.key(),
        "cache_key": inputs.digest(),
        "cmdline": inputs.cmdline,
        "kernel_version": release,
        "installed": installed,
        "apt_sources": list(sources.lines),
        "disk": {"root_label": "root", "size": inputs.disk_size, "boot": "extlinux"},
        "files": {name: describe(scratch / name) for name in _OUTPUTS},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _extract_boot_files(tree: Path, release: str, scratch: Path) -> None:
    """Copy the kernel and initramfs out of the tree, and make the PVH vmlinux from the kernel."""
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    initrd = tree / "boot" / f"initrd.img-{release}"
    for path in (vmlinuz, initrd):
        if not path.is_file():
            raise GuestBuildError(
                f"the guest tree has no {path.relative_to(tree)}: the kernel apt installed is "
                f"not {release}; run `apt-get update` on the host and build again"
            )
    shutil.copyfile(vmlinuz, scratch / VMLINUZ)
    shutil.copyfile(initrd, scratch / INITRD)
    (scratch / VMLINUX).write_bytes(extract_vmlinux(vmlinuz.read_bytes()))

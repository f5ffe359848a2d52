"""A test-only initrd that can mount the Debian test guest's root from a SATA disk (and sees
its SATA CD-ROM early).

The shared guest's initrd (initramfs-tools, MODULES=list) holds virtio-pci, virtio-blk and
ext4 only, so its root can only be on virtio. The shared image is not rebuilt for this: the
initrd is the guest's own, unchanged, followed by a second (uncompressed) cpio archive that
the kernel unpacks over it (Linux takes a sequence of archives), holding the AHCI and SCSI
disk modules from the same kernel package and an init-top script that insmods them in order
before udev starts. Written under a test's temporary directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from nomad_vm.guests.kernel import collect_modules

# The disk, and the CD-ROM (the seed) so that it is there before cloud-init looks for it.
WANTED = ("ahci", "sd_mod", "sr_mod")
SCRIPT = "nomad_sata"
# Subtrees of the kernel package where these modules and their dependencies live.
SUBTREES = (
    "drivers/ata",
    "drivers/scsi",
    "drivers/cdrom",
    "block",
    "lib",
    "crypto",
    "arch/x86/crypto",
)


def build_sata_initrd(guest, debs: Path, out_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    """``guest``'s initrd plus the SATA modules; returns the new file in ``out_dir``."""
    release = guest.kernel_version
    (deb,) = debs.glob(f"linux-image-{release}_*.deb")
    unpacked = out_dir / "kernel"
    unpacked.mkdir(parents=True)
    members = [f"./lib/modules/{release}/kernel/{sub}" for sub in SUBTREES]
    members.append(f"./lib/modules/{release}/modules.builtin")
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(unpacked), *members], stdin=tar.stdout, check=True)
    assert tar.wait() == 0
    modules = collect_modules(unpacked / "lib" / "modules" / release, WANTED, release)
    root = out_dir / "overlay"
    mod_dir = root / "usr" / "lib" / "modules" / release / "nomad-sata"
    mod_dir.mkdir(parents=True)
    for module in modules:
        (mod_dir / f"{module.name}.ko").write_bytes(module.data)
    top = root / "scripts" / "init-top"
    top.mkdir(parents=True)
    inside = f"/{mod_dir.relative_to(root)}"
    loads = "".join(f"insmod {inside}/{m.name}.ko\n" for m in modules)
    script = top / SCRIPT
    script.write_text('#!/bin/sh\ncase "$1" in prereqs) exit 0 ;; esac\n' + loads)
    script.chmod(0o755)
    # The archive's ORDER replaces the guest's: ours first, then the guest's own scripts.
    original = _member(guest.initrd, "scripts/init-top/ORDER", out_dir)
    order = f'/scripts/init-top/{SCRIPT} "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
    (top / "ORDER").write_text(order + original)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    result = out_dir / "initrd-sata.img"
    first = guest.initrd.read_bytes()
    # The kernel looks for the next archive's header at a 4-byte boundary (zeros between
    # archives are skipped).
    result.write_bytes(first + bytes(-len(first) % 4) + archive)
    return result


def _member(initrd: Path, name: str, work: Path) -> str:
    """One file of the guest's (gzip) initrd."""
    extract = work / "original"
    extract.mkdir(exist_ok=True)
    gunzip = subprocess.Popen(["gzip", "-dc", str(initrd)], stdout=subprocess.PIPE)
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", name], stdin=gunzip.stdout, cwd=extract, check=True
    )
    gunzip.wait()
    return (extract / name).read_text()

"""A test-only initramfs: the tiny guest's, plus the virtio_mem module (hot-pluggable memory).

The shared tiny guest (``.cache/guests/tiny``) loads only the modules of its build's list, and
virtio_mem is not one of them; the shared image is not rebuilt for this. The variant is the
tiny initramfs unchanged, followed by a second newc archive (the kernel unpacks a sequence of
archives, later files replacing earlier ones) holding virtio_mem.ko from the same kernel
package and a module list that is the original one plus virtio_mem. Written under a test's
temporary directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from nomad_vm.guests.kernel import collect_modules

MODULE_LIST = "etc/nomad-vm/modules"
WANTED = ("virtio_mem",)


def build_vmem_initramfs(guest, debs: Path, out_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    """``guest``'s (a TinyGuest) initramfs plus virtio_mem; returns the new file in ``out_dir``."""
    release = guest.kernel_version
    (deb,) = debs.glob(f"linux-image-{release}_*.deb")
    unpacked = out_dir / "kernel"
    unpacked.mkdir(parents=True)
    members = [
        f"./lib/modules/{release}/kernel/drivers/virtio",
        f"./lib/modules/{release}/modules.builtin",
    ]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(unpacked), *members], stdin=tar.stdout, check=True)
    assert tar.wait() == 0
    # virtio_mem's dependencies (virtio, virtio_ring) are in the tiny guest's list already.
    modules = collect_modules(unpacked / "lib" / "modules" / release, WANTED, release)
    original = _member(guest.initramfs, MODULE_LIST, out_dir).split()
    root = out_dir / "overlay"
    (root / "lib" / "modules").mkdir(parents=True)
    added = []
    for module in modules:
        if module.name not in original:
            (root / "lib" / "modules" / f"{module.name}.ko").write_bytes(module.data)
            added.append(module.name)
    (root / MODULE_LIST).parent.mkdir(parents=True)
    (root / MODULE_LIST).write_text("\n".join([*original, *added]) + "\n")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    first = guest.initramfs.read_bytes()
    result = out_dir / "initramfs-vmem.img"
    # The kernel looks for the next archive's header at a 4-byte boundary.
    result.write_bytes(first + bytes(-len(first) % 4) + archive)
    return result


def _member(initramfs: Path, name: str, work: Path) -> str:
    """One file of the tiny guest's (uncompressed newc) initramfs."""
    extract = work / "original"
    extract.mkdir(exist_ok=True)
    with initramfs.open("rb") as archive:
        subprocess.run(
            ["cpio", "-i", "-d", "--quiet", name], stdin=archive, cwd=extract, check=True
        )
    return (extract / name).read_text()

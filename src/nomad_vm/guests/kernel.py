"""Kernel pieces for the test guests: the PVH-bootable vmlinux and kernel modules in load order.

Debian ships a bzImage whose payload is an XZ-compressed ELF ``vmlinux``. QEMU can boot that ELF
directly through the PVH entry point, which skips the in-guest decompression (several seconds
under TCG). Modules are taken from the same package; their load order comes from the
``depends=`` string in each module's ``.modinfo`` ELF section, so no depmod/kmod is needed.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import GuestBuildError

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"

# Module file suffixes Debian has used (plain since bookworm; compressed in some other releases).
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

_ELF64_HEADER = struct.Struct("<16xHHIQQQIHHHHHH")
_ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")


def extract_vmlinux(image: bytes) -> bytes:
    """Return the ELF kernel embedded XZ-compressed in a bzImage.

    Scans for every XZ stream header, because the magic can also occur by chance inside the
    setup code; the first stream that decompresses to an ELF image is the kernel. Trailing bytes
    after the ELF (x86 relocation tables) are kept: QEMU's ELF loader ignores them.
    """
    start = image.find(XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            payload = decompressor.decompress(image[start:])
        except lzma.LZMAError:
            payload = b""
        if payload.startswith(ELF_MAGIC):
            return payload
        start = image.find(XZ_MAGIC, start + 1)
    raise GuestBuildError(
        "no XZ-compressed ELF kernel found in the bzImage; the kernel package may use another "
        "compression (only XZ, Debian's choice, is supported)"
    )


def elf_section(elf: bytes, wanted: str) -> bytes | None:
    """The contents of the named section of a little-endian ELF64 file, or None if absent."""
    if len(elf) < 64 or not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        raise GuestBuildError("not a little-endian ELF64 file (expected an x86-64 kernel module)")
    fields = _ELF64_HEADER.unpack_from(elf, 0)
    shoff, shentsize, shnum, shstrndx = fields[5], fields[10], fields[11], fields[12]
    if shentsize < _ELF64_SECTION.size or shoff + shnum * shentsize > len(elf):
        raise GuestBuildError("truncated ELF section table")

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size, *_ = _ELF64_SECTION.unpack_from(
            elf, shoff + index * shentsize
        )
        return name, offset, size

    _, str_offset, str_size = section(shstrndx)
    names = elf[str_offset : str_offset + str_size]
    for index in range(shnum):
        name_offset, offset, size = section(index)
        end = names.find(b"\0", name_offset)
        if names[name_offset:end].decode("ascii", "replace") == wanted:
            return elf[offset : offset + size]
    return None


def parse_modinfo(section: bytes) -> dict[str, list[str]]:
    """Split a ``.modinfo`` section (NUL-separated ``key=value`` strings) into a multimap."""
    info: dict[str, list[str]] = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def parse_depends(info: dict[str, list[str]]) -> list[str]:
    """Module names from the ``depends=`` field ("" means none; names are comma separated)."""
    values = info.get("depends", [""])
    return [normalize(name) for name in values[0].split(",") if name.strip()]


def normalize(name: str) -> str:
    """The kernel treats ``-`` and ``_`` in module names alike; file names may use either."""
    return name.strip().replace("-", "_")


def module_name(path: Path) -> str:
    return normalize(path.name.split(".ko", 1)[0])


def decompress_module(path: Path) -> bytes:
    """A module's plain ELF bytes: busybox insmod only loads uncompressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        # The standard library gained zstd only in Python 3.14; use the zstd tool until then.
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], check=True, capture_output=True
            ).stdout
        except FileNotFoundError as exc:
            raise GuestBuildError(
                f"{path.name} is zstd-compressed: install the zstd package on the host"
            ) from exc
        except subprocess.CalledProcessError as exc:
            raise GuestBuildError(f"zstd could not decompress {path}: {exc.stderr!r}") from exc
    return data


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map module name -> file for every module under ``lib/modules/<release>/kernel``."""
    found: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES):
            found.setdefault(module_name(path), path)
    return found


def builtin_modules(modules_dir: Path) -> frozenset[str]:
    """Names listed in ``modules.builtin``: compiled into the kernel, nothing to load."""
    listing = modules_dir / "modules.builtin"
    if not listing.is_file():
        return frozenset()
    lines = listing.read_text().splitlines()
    return frozenset(module_name(Path(line)) for line in lines if line.strip())


def resolve_load_order(
    wanted: Iterable[str],
    depends_of: Callable[[str], Sequence[str]],
    builtin: frozenset[str] = frozenset(),
) -> list[str]:
    """Order ``wanted`` and everything they depend on so that dependencies load first.

    Depth-first post-order, visiting ``wanted`` in the order given, so the result is
    deterministic. Built-in modules are skipped along with their (also built-in) dependencies.
    """
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        state[name] = "visiting"
        for dependency in depends_of(name):
            visit(normalize(dependency), (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(normalize(name), ())
    return order


@dataclass(frozen=True)
class KernelModule:
    name: str
    data: bytes  # uncompressed ELF, ready for insmod


def collect_modules(modules_dir: Path, wanted: Iterable[str], release: str) -> list[KernelModule]:
    """Read ``wanted`` modules and their dependencies from an unpacked kernel package, in load
    order. Checks each module's vermagic so a mismatch fails here, not at insmod in the guest."""
    files = index_modules(modules_dir)
    loaded: dict[str, KernelModule] = {}

    def depends_of(name: str) -> list[str]:
        path = files.get(name)
        if path is None:
            raise GuestBuildError(f"kernel module {name} not found under {modules_dir}")
        data = decompress_module(path)
        section = elf_section(data, ".modinfo")
        info = parse_modinfo(section or b"")
        vermagic = info.get("vermagic", [""])[0].split(" ", 1)[0]
        if vermagic != release:
            raise GuestBuildError(f"{path.name} was built for {vermagic!r}, not {release!r}")
        loaded[name] = KernelModule(name, data)
        return parse_depends(info)

    order = resolve_load_order(wanted, depends_of, builtin_modules(modules_dir))
    return [loaded[name] for name in order]

"""Unit tests for the pure parts of the tiny guest build (no apt, no QEMU)."""

from __future__ import annotations

import base64
import dataclasses
import json
import lzma
import re
import struct
import subprocess
from pathlib import Path

import pytest

from nomad_vm.errors import GuestBuildError
from nomad_vm.guests import debian_packages, kernel, tiny
from nomad_vm.guests.cache import MANIFEST
from nomad_vm.guests.debian_packages import DebPackage
from nomad_vm.guests.initramfs import write_cpio

RELEASE = "6.1.0-99-amd64"


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal little-endian ELF64 file holding ``sections`` (plus the required null section
    and a section-name table), enough for ``kernel.elf_section`` and real ELF readers."""
    names = b"\0" + b"".join(name.encode() + b"\0" for name in [*sections, ".shstrtab"])
    body = bytearray()
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    name_offset = 1
    for name, data in [*sections.items(), (".shstrtab", names)]:
        offset = 64 + len(body)
        body += data
        headers.append(
            struct.pack("<IIQQQQIIQQ", name_offset, 1, 0, 0, offset, len(data), 0, 0, 1, 0)
        )
        name_offset += len(name) + 1
    shoff = 64 + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers), len(headers) - 1
    )
    return header + bytes(body) + b"".join(headers)


def make_module(name: str, depends: str, release: str = RELEASE) -> bytes:
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0vermagic={release} SMP mod_unload\0"
    return make_elf({".text": b"\x90" * 8, ".modinfo": modinfo.encode()})


# --- vmlinux extraction ---------------------------------------------------------------------


def test_extract_vmlinux_finds_elf_after_false_magic() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    stream = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    # A stray magic that is not a valid stream, then the real one, then trailing size bytes
    # as the kernel's build appends them.
    image = b"MZ setup code" + kernel.XZ_MAGIC + b"not xz" + stream + struct.pack("<I", len(elf))
    assert kernel.extract_vmlinux(image) == elf


def test_extract_vmlinux_rejects_non_elf_payload() -> None:
    stream = lzma.compress(b"just data, not a kernel", format=lzma.FORMAT_XZ)
    with pytest.raises(GuestBuildError, match="no XZ-compressed ELF"):
        kernel.extract_vmlinux(b"header" + stream)


def test_extract_vmlinux_without_xz_stream() -> None:
    with pytest.raises(GuestBuildError):
        kernel.extract_vmlinux(b"\x1f\x8b\x08 gzip is not supported")


# --- modinfo parsing and load order ---------------------------------------------------------


def test_elf_section_and_modinfo_depends() -> None:
    module = make_module("virtio_pci", "virtio_ring,virtio_pci-modern-dev,virtio")
    section = kernel.elf_section(module, ".modinfo")
    assert section is not None
    info = kernel.parse_modinfo(section)
    assert info["name"] == ["virtio_pci"]
    assert kernel.parse_depends(info) == ["virtio_ring", "virtio_pci_modern_dev", "virtio"]
    assert kernel.elf_section(module, ".missing") is None


def test_empty_depends_means_no_dependencies() -> None:
    assert kernel.parse_depends(kernel.parse_modinfo(b"depends=\0name=button\0")) == []
    assert kernel.parse_depends({}) == []


def test_elf_section_rejects_non_elf() -> None:
    with pytest.raises(GuestBuildError):
        kernel.elf_section(b"not an elf file" * 8, ".modinfo")


def test_load_order_puts_dependencies_first_and_is_stable() -> None:
    graph = {
        "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio"],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_pci_modern_dev": [],
        "virtio_console": ["virtio", "virtio_ring"],
        "button": [],
    }
    order = kernel.resolve_load_order(["virtio_console", "virtio_pci", "button"], graph.__getitem__)
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_console",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "button",
    ]
    for name, dependencies in graph.items():
        for dependency in dependencies:
            assert order.index(dependency) < order.index(name)


def test_load_order_skips_builtin_and_normalizes_dashes() -> None:
    graph = {"virtio_blk": ["virtio"], "virtio": ["virtio_ring"], "virtio_ring": []}
    order = kernel.resolve_load_order(["virtio-blk"], graph.__getitem__, frozenset({"virtio"}))
    assert order == ["virtio_blk"]


def test_load_order_detects_cycles() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"]}
    with pytest.raises(GuestBuildError, match="a -> b -> c -> a"):
        kernel.resolve_load_order(["a"], graph.__getitem__)


def test_collect_modules_from_tree(tmp_path: Path) -> None:
    drivers = tmp_path / "kernel" / "drivers"
    drivers.mkdir(parents=True)
    (drivers / "virtio_ring.ko").write_bytes(make_module("virtio_ring", ""))
    (drivers / "virtio.ko.xz").write_bytes(
        lzma.compress(make_module("virtio", "virtio_ring"), format=lzma.FORMAT_XZ)
    )
    (drivers / "virtio-rng.ko").write_bytes(make_module("virtio_rng", "virtio,virtio_ring"))
    (drivers / "evdev.ko").write_bytes(make_module("evdev", ""))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/input/evdev.ko\n")

    modules = kernel.collect_modules(tmp_path, ["virtio_rng", "evdev"], RELEASE)
    assert [module.name for module in modules] == ["virtio_ring", "virtio", "virtio_rng"]
    # The compressed module is stored decompressed: busybox insmod takes plain ELF only.
    assert modules[1].data.startswith(kernel.ELF_MAGIC)


def test_collect_modules_errors(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "button.ko").write_bytes(make_module("button", "", "5.10.0-1-amd64"))
    with pytest.raises(GuestBuildError, match=re.escape("built for '5.10.0-1-amd64'")):
        kernel.collect_modules(tmp_path, ["button"], RELEASE)
    with pytest.raises(GuestBuildError, match="not found"):
        kernel.collect_modules(tmp_path, ["virtio_console"], RELEASE)


# --- kernel command line --------------------------------------------------------------------


def test_tiny_cmdline_without_command_is_unchanged() -> None:
    assert tiny.tiny_cmdline(tiny.DEFAULT_CMDLINE, None) == tiny.DEFAULT_CMDLINE


def test_tiny_cmdline_encodes_command() -> None:
    command = "echo 'a b' \"c\"; exit 3\n"
    cmdline = tiny.tiny_cmdline("console=ttyS0 quiet", command)
    words = cmdline.split()
    assert words[:2] == ["console=ttyS0", "quiet"]
    key, _, value = words[2].partition("=")
    assert key == "nomadvm.run"
    assert base64.b64decode(value).decode() == command
    assert len(words) == 3  # the encoding keeps spaces out of the kernel's word splitting


def test_tiny_cmdline_rejects_overlong_command() -> None:
    with pytest.raises(GuestBuildError, match="over the x86 limit"):
        tiny.tiny_cmdline(tiny.DEFAULT_CMDLINE, "x" * 2000)


def test_default_cmdline_has_the_settings_we_rely_on() -> None:
    words = tiny.DEFAULT_CMDLINE.split()
    assert {"console=ttyS0", "no_timer_check", "panic=-1"} <= set(words)


# --- cache key ------------------------------------------------------------------------------


def base_inputs() -> tiny.TinyInputs:
    return tiny.TinyInputs(
        kernel=DebPackage("linux-image-6.1.0-99-amd64", "6.1.200-1"),
        busybox=DebPackage("busybox-static", "1:1.35.0-4"),
        init_sha256="0" * 64,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"kernel": DebPackage("linux-image-6.1.0-99-amd64", "6.1.200-2")},
        {"kernel": DebPackage("linux-image-6.1.0-100-amd64", "6.1.200-1")},
        {"busybox": DebPackage("busybox-static", "1:1.35.0-5")},
        {"init_sha256": "1" * 64},
        {"modules": ("button",)},
        {"format_version": tiny.FORMAT_VERSION + 1},
    ],
)
def test_cache_key_changes_with_every_input(change: dict[str, object]) -> None:
    before = base_inputs()
    after = dataclasses.replace(before, **change)  # type: ignore[arg-type]
    assert after.key() != before.key()
    assert after.digest() != before.digest()


def test_cache_key_is_stable_and_json() -> None:
    assert base_inputs().digest() == base_inputs().digest()
    assert json.loads(json.dumps(base_inputs().key())) == base_inputs().key()


def test_init_script_is_package_data_with_the_protocol_lines() -> None:
    script = tiny.init_script().decode()
    assert script.startswith("#!/bin/sh\n")
    for text in ("booted", "command exited with status", "running", "uptime", "poweroff -f"):
        assert text in script


def write_fake_build(tiny_dir: Path, inputs: tiny.TinyInputs) -> None:
    tiny_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in (tiny.VMLINUX, tiny.INITRAMFS):
        (tiny_dir / name).write_bytes(b"x" * 10)
        files[name] = {"size": 10, "sha256": ""}
    manifest = {"inputs": inputs.key(), "kernel_version": RELEASE, "files": files}
    (tiny_dir / MANIFEST).write_text(json.dumps(manifest))


def test_build_tiny_reuses_matching_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = base_inputs()
    write_fake_build(tmp_path / "tiny", inputs)
    monkeypatch.setattr(tiny, "tiny_inputs", lambda: inputs)
    built: list[tiny.TinyInputs] = []

    def fake_build(cache_dir: Path, tiny_dir: Path, new: tiny.TinyInputs) -> tiny.TinyGuest:
        built.append(new)
        return tiny.TinyGuest(tiny_dir / "v", tiny_dir / "i", "new")

    monkeypatch.setattr(tiny, "_build", fake_build)
    guest = tiny.build_tiny(tmp_path)
    assert guest.kernel_version == RELEASE and built == []
    assert guest.vmlinux == tmp_path / "tiny" / "vmlinux"

    tiny.build_tiny(tmp_path, force=True)
    assert built == [inputs]

    changed = dataclasses.replace(inputs, init_sha256="2" * 64)
    monkeypatch.setattr(tiny, "tiny_inputs", lambda: changed)
    tiny.build_tiny(tmp_path)
    assert built == [inputs, changed]


def test_build_tiny_uses_cache_when_apt_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_apt() -> tiny.TinyInputs:
        raise GuestBuildError("apt-cache is not installed")

    monkeypatch.setattr(tiny, "tiny_inputs", no_apt)
    with pytest.raises(GuestBuildError):
        tiny.build_tiny(tmp_path)
    write_fake_build(tmp_path / "tiny", base_inputs())
    assert tiny.build_tiny(tmp_path).kernel_version == RELEASE
    # A truncated output invalidates the cached build.
    (tmp_path / "tiny" / tiny.INITRAMFS).write_bytes(b"x")
    assert tiny.cached_tiny(tmp_path) is None


# --- Debian metadata parsing ----------------------------------------------------------------


def test_parse_control_stanzas() -> None:
    text = (
        "Package: linux-image-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: Linux\n long text\n\n"
        "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\n"
    )
    stanzas = debian_packages.parse_control(text)
    assert [stanza["Package"] for stanza in stanzas] == ["linux-image-amd64", "busybox-static"]
    assert stanzas[1]["Version"] == "1:1.35.0-4+deb12u1+b1"
    target = debian_packages.kernel_package(stanzas[0])
    assert target == DebPackage("linux-image-6.1.0-56-amd64", "6.1.192-2")
    assert debian_packages.kernel_release(target) == "6.1.0-56-amd64"


def test_metapackage_target_without_exact_version() -> None:
    depends = "initramfs-tools | linux-initramfs-tool, linux-image-6.12.0-1-amd64 (>= 6.12)"
    assert (
        debian_packages.metapackage_target(depends, "linux-image-") == "linux-image-6.12.0-1-amd64"
    )
    with pytest.raises(GuestBuildError):
        debian_packages.metapackage_target("libc6 (>= 2.36)", "linux-image-")


def test_parse_print_uris() -> None:
    line = (
        "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1_amd64"
        ".deb' busybox-static_1%3a1.35.0-4+deb12u1_amd64.deb 928188 SHA256:3d3fdbe9\n"
    )
    (uri,) = debian_packages.parse_print_uris(line)
    assert uri.filename == "busybox-static_1%3a1.35.0-4+deb12u1_amd64.deb"
    assert uri.size == 928188 and uri.checksum == "SHA256:3d3fdbe9"


def test_write_cpio_archives_tree_as_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "init").write_text("#!/bin/sh\n")
    (root / "bin" / "sh").symlink_to("/bin/busybox")
    archive = tmp_path / "initramfs.img"
    write_cpio(root, archive)
    assert archive.read_bytes().startswith(b"070701")  # newc magic
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/sh -> /bin/busybox" in listing
    assert all(" root " in line or " 0 " in line for line in listing.splitlines())


def test_run_tool_errors_say_what_failed_and_what_to_do() -> None:
    with pytest.raises(GuestBuildError, match=r"unpacking x: `no-such-tool-nvm` is not installed"):
        debian_packages.run_tool(["no-such-tool-nvm"], what="unpacking x", hint="install it")
    with pytest.raises(GuestBuildError, match=r"exited with status 1 .*boom.*; try again"):
        debian_packages.run_tool(
            ["sh", "-c", "echo boom >&2; exit 1"], what="step", hint="try again"
        )

"""The disk layer's pure rules: sizes, formats, backing-chain checks, qemu-img JSON parsing.

No qemu-img here: ImageInfo values are made by hand; files exist only to be resolved."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError, ImageError
from nomad_vm.storage.chain import backing_of, check_level
from nomad_vm.storage.disk import MAX_DISK_MB, MIB, can_share, check_requested_size, target_size
from nomad_vm.storage.held import FileHolder
from nomad_vm.storage.qemu_img import ImageInfo, parse_info


def image(path: Path, fmt: str = "qcow2", **kw: object) -> ImageInfo:
    return ImageInfo(path=path, format=fmt, virtual_size=64 * MIB, actual_size=4096, **kw)  # type: ignore[arg-type]


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret"
    secret.parent.mkdir()
    secret.write_text("root:$6$hash")
    return secret


# ---- sizes ---------------------------------------------------------------------------------


def test_no_size_keeps_the_image_size() -> None:
    assert target_size(None, 3 * 1024 * MIB) is None


def test_equal_size_needs_no_resize() -> None:
    assert target_size(3072, 3072 * MIB) is None


def test_larger_size_is_in_bytes() -> None:
    assert target_size(4096, 3072 * MIB) == 4096 * MIB


def test_shrink_is_refused_naming_both_sizes() -> None:
    with pytest.raises(ImageError) as err:
        target_size(2048, 3072 * MIB)
    assert err.value.field == "config.primary_disk_size"
    assert "2048 MB is smaller than the image's virtual size of 3072 MB" in err.value.reason
    assert "only grow" in err.value.reason


def test_unaligned_virtual_size_rounds_up_and_shows_bytes() -> None:
    with pytest.raises(ImageError) as err:
        target_size(3072, 3072 * MIB + 512)
    assert "3073 MB" in err.value.reason
    assert f"{3072 * MIB + 512} bytes" in err.value.reason
    assert target_size(3073, 3072 * MIB + 512) == 3073 * MIB


@pytest.mark.parametrize("bad", [0, -1, MAX_DISK_MB + 1])
def test_requested_size_out_of_range(bad: int) -> None:
    with pytest.raises(ImageError) as err:
        check_requested_size(bad)
    assert err.value.field == "config.primary_disk_size"


def test_requested_size_in_range() -> None:
    check_requested_size(None)
    check_requested_size(1)
    check_requested_size(MAX_DISK_MB)


# ---- one level: format, encryption, external files -------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed"])
def test_accepted_formats(fmt: str, allowed: Path) -> None:
    check_level(image(allowed / "a", fmt), [str(allowed)], "config.image")


@pytest.mark.parametrize("fmt", ["dmg", "cloop", "bochs", "parallels", "qcow", "file"])
def test_other_formats_are_refused_with_a_way_out(fmt: str, allowed: Path) -> None:
    with pytest.raises(ImageError) as err:
        check_level(image(allowed / "a", fmt), [str(allowed)], "config.image")
    assert err.value.field == "config.image"
    assert repr(fmt) in err.value.reason
    assert "qemu-img convert" in err.value.reason


@pytest.mark.parametrize(("fmt", "encrypted"), [("luks", False), ("qcow2", True)])
def test_encrypted_images_are_refused(fmt: str, encrypted: bool, allowed: Path) -> None:
    with pytest.raises(ImageError, match="encrypted"):
        check_level(image(allowed / "a", fmt, encrypted=encrypted), [str(allowed)], "config.image")


def test_external_data_file_is_refused(allowed: Path) -> None:
    level = image(allowed / "a", data_file="/etc/hostname")
    with pytest.raises(ImageError, match="external file"):
        check_level(level, [str(allowed)], "config.image")


def test_vmdk_extents_must_stay_inside(allowed: Path, outside: Path) -> None:
    inside = allowed / "disk-flat.vmdk"
    inside.write_bytes(b"\0" * 512)
    check_level(image(allowed / "d.vmdk", "vmdk", extent_files=(str(inside),)), [str(allowed)], "f")
    bad = image(allowed / "d.vmdk", "vmdk", extent_files=(str(inside), str(outside)))
    with pytest.raises(ImageError) as err:
        check_level(bad, [str(allowed)], "config.image")
    assert err.value.field == "config.image"
    assert str(outside) in err.value.reason
    assert "outside the allowed directories" in err.value.reason


# ---- backing files ---------------------------------------------------------------------------


@pytest.fixture
def holder() -> Iterator[FileHolder]:
    with FileHolder() as files:
        yield files


def test_no_backing_file(allowed: Path, holder: FileHolder) -> None:
    assert backing_of(image(allowed / "a"), [str(allowed)], "config.image", holder) is None


def test_backing_file_inside_is_resolved(allowed: Path, holder: FileHolder) -> None:
    base = allowed / "sub" / "base.raw"
    base.parent.mkdir()
    base.write_bytes(b"")
    name = str(allowed / "sub" / ".." / "sub" / "base.raw")
    level = image(allowed / "a", backing_chain=(name,), backing_format="raw")
    found = backing_of(level, [str(allowed)], "config.image", holder)
    assert found is not None
    held, fmt = found
    assert (held.path, fmt) == (base, "raw")
    assert os.path.samestat(os.fstat(held.fd), os.stat(base))


def test_a_relative_backing_name_is_relative_to_the_images_real_directory(
    allowed: Path, holder: FileHolder
) -> None:
    (allowed / "sub").mkdir()
    base = allowed / "sub" / "base.raw"
    base.write_bytes(b"")
    level = image(allowed / "sub" / "a", backing_filename="base.raw", backing_format="raw")
    found = backing_of(level, [str(allowed)], "config.image", holder)
    assert found is not None and found[0].path == base


def test_backing_file_outside_is_refused_by_name(
    allowed: Path, outside: Path, holder: FileHolder
) -> None:
    level = image(allowed / "a", backing_chain=(str(outside),), backing_format="raw")
    with pytest.raises(ImageError) as err:
        backing_of(level, [str(allowed)], "config.image", holder)
    assert err.value.field == "config.image"
    assert f"has backing file {outside}" in err.value.reason
    assert "outside the allowed directories" in err.value.reason
    assert "image_paths" not in err.value.reason  # widening the allowlist is not the fix


def test_dotdot_and_symlinks_do_not_escape(
    allowed: Path, outside: Path, holder: FileHolder
) -> None:
    link = allowed / "innocent.raw"
    link.symlink_to(outside)
    for name in (str(link), f"{allowed}/../elsewhere/secret"):
        level = image(allowed / "a", backing_chain=(name,), backing_format="raw")
        with pytest.raises(ImageError, match="outside the allowed directories"):
            backing_of(level, [str(allowed)], "config.image", holder)


@pytest.mark.parametrize(
    "name", ["nbd://127.0.0.1:10809/x", 'json:{"driver": "file"}', "http://h/x", "nbd:h:10809"]
)
def test_non_file_backing_is_refused(name: str, allowed: Path, holder: FileHolder) -> None:
    level = image(allowed / "a", backing_chain=(name,), backing_format="raw")
    with pytest.raises(ImageError, match="not a plain file path"):
        backing_of(level, [str(allowed)], "config.image", holder)


def test_missing_backing_file(allowed: Path, holder: FileHolder) -> None:
    level = image(allowed / "a", backing_chain=(str(allowed / "gone.raw"),), backing_format="raw")
    with pytest.raises(ImageError, match="no such file"):
        backing_of(level, [str(allowed)], "config.image", holder)


def test_backing_fifo_is_refused(allowed: Path, holder: FileHolder) -> None:
    fifo = allowed / "fifo.raw"
    os.mkfifo(fifo)
    level = image(allowed / "a", backing_chain=(str(fifo),), backing_format="raw")
    with pytest.raises(ImageError, match="not a regular file"):
        backing_of(level, [str(allowed)], "config.image", holder)


def test_unrecorded_backing_format_is_refused(allowed: Path, holder: FileHolder) -> None:
    base = allowed / "base.img"
    base.write_bytes(b"")
    level = image(allowed / "a", backing_chain=(str(base),))
    with pytest.raises(ImageError) as err:
        backing_of(level, [str(allowed)], "config.image", holder)
    assert "does not record its format" in err.value.reason
    assert "qemu-img rebase -u" in err.value.reason


def test_unsupported_backing_format_is_refused(allowed: Path, holder: FileHolder) -> None:
    base = allowed / "base.img"
    base.write_bytes(b"")
    level = image(allowed / "a", backing_chain=(str(base),), backing_format="host_device")
    with pytest.raises(ImageError, match="host_device"):
        backing_of(level, [str(allowed)], "config.image", holder)


def test_only_raw_and_qcow2_chains_are_shared(tmp_path: Path) -> None:
    assert can_share([image(tmp_path / "a", "qcow2"), image(tmp_path / "b", "raw")])
    assert not can_share([image(tmp_path / "a", "qcow2"), image(tmp_path / "b", "vmdk")])
    assert not can_share([image(tmp_path / "a", "vdi")])


# ---- qemu-img info JSON ----------------------------------------------------------------------


def test_parse_single_image_with_backing() -> None:
    text = json.dumps(
        {
            "virtual-size": 1024,
            "filename": "/i/ov.qcow2",
            "format": "qcow2",
            "actual-size": 200704,
            "backing-filename": "base.raw",
            "full-backing-filename": "/i/base.raw",
            "backing-filename-format": "raw",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}},
        }
    )
    got = parse_info(text, Path("/i/ov.qcow2"))
    assert got == ImageInfo(
        Path("/i/ov.qcow2"),
        "qcow2",
        1024,
        200704,
        ("/i/base.raw",),
        "raw",
        False,
        None,
        (),
        backing_filename="base.raw",
    )


def test_parse_backing_chain_list() -> None:
    levels = [
        {"format": "qcow2", "virtual-size": 5, "full-backing-filename": "/i/mid.qcow2"},
        {"format": "qcow2", "virtual-size": 5, "full-backing-filename": "/i/base.raw"},
        {"format": "raw", "virtual-size": 5},
    ]
    got = parse_info(json.dumps(levels), Path("/i/top"))
    assert got.backing_chain == ("/i/mid.qcow2", "/i/base.raw")
    assert got.actual_size == 0  # absent for some protocols


def test_parse_vmdk_extents_data_file_and_encryption() -> None:
    vmdk = {
        "format": "vmdk",
        "virtual-size": 2048,
        "format-specific": {"type": "vmdk", "data": {"extents": [{"filename": "/etc/x"}]}},
    }
    assert parse_info(json.dumps(vmdk), Path("/a")).extent_files == ("/etc/x",)
    qcow = {
        "format": "qcow2",
        "virtual-size": 2048,
        "encrypted": True,
        "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/y"}},
    }
    got = parse_info(json.dumps(qcow), Path("/a"))
    assert got.data_file == "/etc/y"
    assert got.encrypted


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "{}",
        '{"format": "raw"}',
        '{"format": 1, "virtual-size": 1}',
        '{"format": "raw", "virtual-size": true}',
        '{"format": "raw", "virtual-size": "1"}',
    ],
)
def test_unexpected_json_is_a_hypervisor_error(text: str) -> None:
    with pytest.raises(HypervisorError, match="unexpected JSON"):
        parse_info(text, Path("/a"))

"""The disk layer against the real qemu-img (Debian qemu-utils), on small images in tmp_path.

Malicious images name files in tmp_path outside the allowed directory, never real host files:
a wrong answer here must not be able to damage the machine running the tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError, ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.disk import MIB, PreparedDisk, prepare_boot_disk
from nomad_vm.storage.integrity import IntactImages
from nomad_vm.storage.qemu_img_run import QemuImgError
from tests.integration.damaged_images import (
    cut_in_the_data,
    header_only,
    leaked_clusters,
    whole_qcow2,
    zeroed_refcounts,
)

pytestmark = pytest.mark.integration

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")
# make setup installs them (Debian qemu-utils); a missing one is a failure, not a skip.
assert QEMU_IMG and QEMU_IO and QEMU_NBD, "qemu-img, qemu-io and qemu-nbd come from qemu-utils"
TOOL = Path(QEMU_IMG)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "task"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "host" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET!!" * 512)
    return secret


def run(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_raw(path: Path, size_mb: int = 64) -> Path:
    """A sparse raw disk with recognisable data in its first MiB."""
    with path.open("wb") as f:
        f.write(b"BASEDATA" * (MIB // 8))
        f.truncate(size_mb * MIB)
    return path


def make_qcow2(images: Path, size_mb: int = 64) -> Path:
    raw = make_raw(images / "src.raw", size_mb)
    out = images / "base.qcow2"
    run(TOOL, "convert", "-f", "raw", "-O", "qcow2", raw, out)
    raw.unlink()
    return out


def prepare(image: Path, dest: Path, images: Path, **kw: object) -> PreparedDisk:
    opts: dict[str, object] = {"thin": True, "size_mb": None} | kw
    return prepare_boot_disk(TOOL, image, dest, allowed_dirs=[str(images)], **opts)  # type: ignore[arg-type]


def qemu_io(fmt: str, path: Path, command: str) -> None:
    assert QEMU_IO is not None
    run(QEMU_IO, "-f", fmt, "-c", command, path)


def same_content(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    done = subprocess.run(
        [str(TOOL), "compare", "-q", "-f", a_fmt, "-F", b_fmt, str(a), str(b)], check=False
    )
    return done.returncode == 0


# ---- thin copy -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_thin_overlay_writes_only_the_overlay(fmt: str, images: Path, dest: Path) -> None:
    base = make_raw(images / "base.raw") if fmt == "raw" else make_qcow2(images)
    before = sha256(base)
    disk = prepare(base, dest, images, thin=True)
    assert disk.path == dest / "disk.qcow2"
    assert (disk.format, disk.thin, disk.source_format) == ("qcow2", True, fmt)
    assert disk.created == (disk.path,)
    assert disk.virtual_size == 64 * MIB
    chain = qemu_img.info(TOOL, disk.path)
    assert chain.backing_chain == (str(base),)
    assert chain.backing_format == fmt
    assert chain.actual_size < MIB  # metadata only
    assert os.stat(disk.path).st_mode & 0o777 == 0o600

    qemu_io("qcow2", disk.path, "write -P 0xab 0 128k")
    qemu_io("qcow2", disk.path, "read -P 0xab 0 128k")
    assert sha256(base) == before
    assert qemu_img.info(TOOL, base, fmt=fmt).virtual_size == 64 * MIB


@pytest.mark.parametrize("thin", [True, False])
def test_size_grows_the_task_disk_not_the_image(thin: bool, images: Path, dest: Path) -> None:
    base = make_raw(images / "base.raw")
    before = sha256(base)
    disk = prepare(base, dest, images, thin=thin, size_mb=100)
    assert disk.virtual_size == 100 * MIB
    assert qemu_img.info(TOOL, disk.path, fmt="qcow2").virtual_size == 100 * MIB
    assert base.stat().st_size == 64 * MIB
    assert sha256(base) == before


@pytest.mark.parametrize("thin", [True, False])
def test_shrink_is_refused_with_both_sizes(thin: bool, images: Path, dest: Path) -> None:
    base = make_qcow2(images)
    with pytest.raises(ImageError) as err:
        prepare(base, dest, images, thin=thin, size_mb=32)
    assert err.value.field == "config.primary_disk_size"
    assert "32 MB is smaller than the image's virtual size of 64 MB" in str(err.value)
    assert list(dest.iterdir()) == []


# ---- full copy -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_copy_is_independent(fmt: str, images: Path, dest: Path) -> None:
    base = make_raw(images / "base.raw") if fmt == "raw" else make_qcow2(images)
    before = sha256(base)
    disk = prepare(base, dest, images, thin=False)
    assert (disk.format, disk.thin, disk.created) == ("qcow2", False, (disk.path,))
    assert qemu_img.info(TOOL, disk.path).backing_chain == ()
    assert same_content(base, fmt, disk.path, "qcow2")
    qemu_io("qcow2", disk.path, "write -P 0xcd 0 64k")
    assert sha256(base) == before
    assert not same_content(base, fmt, disk.path, "qcow2")


def test_full_copy_of_a_mostly_empty_disk_stays_sparse(images: Path, dest: Path) -> None:
    base = make_raw(images / "big.raw", size_mb=10 * 1024)
    disk = prepare(base, dest, images, thin=False)
    info = qemu_img.info(TOOL, disk.path, fmt="qcow2")
    assert info.virtual_size == 10 * 1024 * MIB
    assert info.actual_size < 8 * MIB, info.actual_size  # 1 MiB of data + metadata
    assert same_content(base, "raw", disk.path, "qcow2")


# ---- other formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("thin", [True, False])
def test_vmdk_is_converted_to_a_private_qcow2(thin: bool, images: Path, dest: Path) -> None:
    raw = make_raw(images / "src.raw")
    vmdk = images / "disk.vmdk"
    run(TOOL, "convert", "-f", "raw", "-O", "vmdk", raw, vmdk)
    before = sha256(vmdk)
    disk = prepare(vmdk, dest, images, thin=thin, size_mb=80)
    assert (disk.format, disk.thin, disk.source_format) == ("qcow2", False, "vmdk")
    assert disk.virtual_size == 80 * MIB
    assert qemu_img.info(TOOL, disk.path).backing_chain == ()
    assert same_content(raw, "raw", disk.path, "qcow2")  # compare ignores the grown tail
    assert sha256(vmdk) == before


def test_random_bytes_are_a_raw_disk(images: Path, dest: Path) -> None:
    # qemu-img probes anything without a known header as raw: that is the user's disk.
    blob = images / "random.bin"
    blob.write_bytes(os.urandom(MIB))
    disk = prepare(blob, dest, images, thin=True)
    assert (disk.source_format, disk.virtual_size) == ("raw", MIB)


def test_missing_image_names_the_field(images: Path, dest: Path) -> None:
    with pytest.raises(ImageError) as err:
        prepare(images / "nope.qcow2", dest, images)
    assert err.value.field == "config.image"
    assert "no such file" in err.value.reason
    assert list(dest.iterdir()) == []


def test_image_outside_allowed_dirs(outside: Path, images: Path, dest: Path) -> None:
    with pytest.raises(ImageError, match="outside the allowed directories"):
        prepare(outside, dest, images)


def test_corrupt_qcow2_is_an_image_error_quoting_qemu_img(images: Path, dest: Path) -> None:
    bad = make_qcow2(images)
    with bad.open("r+b") as f:
        f.seek(20)  # cluster_bits
        f.write((99).to_bytes(4, "big"))
    with pytest.raises(ImageError) as err:
        prepare(bad, dest, images)
    assert err.value.field == "config.image"
    assert "qemu-img cannot open" in err.value.reason
    assert "cluster size" in err.value.reason.lower()
    assert list(dest.iterdir()) == []


def test_luks_is_refused(images: Path, dest: Path) -> None:
    luks = images / "secret.luks"
    argv = [str(TOOL), "create", "-q", "--object", "secret,id=s0,data=pw", "-f", "luks"]
    argv += ["-o", "key-secret=s0,iter-time=10", str(luks), "16M"]
    # LUKS creation times PBKDF2 with getrusage(); under a sandboxed kernel (gVisor here) that
    # clock is coarse and qemu-img sometimes gives up ("Unable to get accurate CPU usage").
    for _ in range(5):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
    else:
        pytest.fail(f"qemu-img could not create a LUKS image here: {done.stderr.strip()}")
    with pytest.raises(ImageError, match="encrypted"):
        prepare(luks, dest, images)
    assert list(dest.iterdir()) == []


# ---- hostile images --------------------------------------------------------------------------


def evil_qcow2(images: Path, backing: str, backing_fmt: str = "raw") -> Path:
    """A qcow2 naming ``backing`` without qemu-img ever opening it (-u)."""
    evil = images / "evil.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt, evil, "4M")
    return evil


@pytest.mark.parametrize("thin", [True, False])
def test_backing_file_outside_allowed_dirs_is_refused(
    thin: bool, outside: Path, images: Path, dest: Path
) -> None:
    evil = evil_qcow2(images, str(outside))
    with pytest.raises(ImageError) as err:
        prepare(evil, dest, images, thin=thin)
    assert err.value.field == "config.image"
    assert f"has backing file {outside}" in err.value.reason
    assert list(dest.iterdir()) == []


def test_relative_and_symlinked_backing_files_are_refused(
    outside: Path, images: Path, dest: Path
) -> None:
    evil = evil_qcow2(images, "../host/secret.raw")
    with pytest.raises(ImageError, match="outside the allowed directories"):
        prepare(evil, dest, images)
    (images / "link.raw").symlink_to(outside)
    evil.unlink()
    evil = evil_qcow2(images, "link.raw")
    with pytest.raises(ImageError, match="outside the allowed directories"):
        prepare(evil, dest, images)
    assert list(dest.iterdir()) == []


def test_network_backing_is_refused_without_connecting(images: Path, dest: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) would hang a connect: failing fast proves nothing was opened.
    evil = evil_qcow2(images, "nbd://192.0.2.1:10809/x")
    started = time.monotonic()
    with pytest.raises(ImageError, match="not a plain file path"):
        prepare(evil, dest, images)
    assert time.monotonic() - started < 5


def test_deeper_level_outside_is_refused(outside: Path, images: Path, dest: Path) -> None:
    mid = images / "mid.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-u", "-b", outside, "-F", "raw", mid, "4M")
    top = images / "top.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    with pytest.raises(ImageError) as err:
        prepare(top, dest, images)
    assert f"{mid} has backing file {outside}" in err.value.reason


def test_backing_loop_is_refused(images: Path, dest: Path) -> None:
    a, b = images / "a.qcow2", images / "b.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-u", "-b", b, "-F", "qcow2", a, "4M")
    run(TOOL, "create", "-q", "-f", "qcow2", "-u", "-b", a, "-F", "qcow2", b, "4M")
    with pytest.raises(ImageError, match="loops back"):
        prepare(a, dest, images)


def test_valid_chain_inside_is_accepted(images: Path, dest: Path) -> None:
    base = make_raw(images / "base.raw")
    mid = images / "mid.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    for thin in (True, False):
        disk = prepare(mid, dest, images, thin=thin)
        assert disk.thin is thin
        assert same_content(base, "raw", disk.path, "qcow2")
        disk.path.unlink()


def test_vmdk_extent_outside_is_refused(outside: Path, images: Path, dest: Path) -> None:
    desc = images / "evil.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW 8 FLAT "{outside}" 0\n'
    )
    with pytest.raises(ImageError) as err:
        prepare(desc, dest, images, thin=False)
    assert f"reads extent file {outside}" in err.value.reason
    assert list(dest.iterdir()) == []


def test_qcow2_external_data_file_is_refused(outside: Path, images: Path, dest: Path) -> None:
    evil = images / "data.qcow2"
    data = outside.parent / "data.raw"  # qemu-img create writes the data file: keep it in tmp
    run(TOOL, "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", evil, "4M")
    with pytest.raises(ImageError, match="external file"):
        prepare(evil, dest, images)


# ---- failures leave nothing behind -----------------------------------------------------------


def test_failure_after_creating_removes_the_disk(
    images: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_resize(*_args: object, **_kw: object) -> None:
        raise HypervisorError("resize broke")

    monkeypatch.setattr(qemu_img, "resize", broken_resize)
    base = make_raw(images / "base.raw")
    with pytest.raises(HypervisorError, match="resize broke"):
        prepare(base, dest, images, thin=False, size_mb=100)
    assert list(dest.iterdir()) == []


def test_existing_disk_is_never_overwritten(images: Path, dest: Path) -> None:
    (dest / "disk.qcow2").write_bytes(b"keep me")
    with pytest.raises(HypervisorError, match="already exists"):
        prepare(make_raw(images / "base.raw"), dest, images)
    assert (dest / "disk.qcow2").read_bytes() == b"keep me"


def test_qemu_img_errors_quote_qemu_img(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError) as err:
        qemu_img.resize(TOOL, tmp_path / "nope.qcow2", "qcow2", MIB)
    assert "nope.qcow2" in str(err.value)
    assert "No such file" in err.value.stderr


# ---- integrity: qemu-img check ---------------------------------------------------------------


def test_check_finds_a_whole_image_intact(images: Path) -> None:
    result = qemu_img.check(TOOL, whole_qcow2(images / "a.qcow2"), "qcow2")
    assert result.intact and (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)


@pytest.mark.parametrize("make", [header_only, cut_in_the_data, zeroed_refcounts])
def test_check_finds_truncation_and_broken_tables(make, images: Path) -> None:  # type: ignore[no-untyped-def]
    result = qemu_img.check(TOOL, make(images / "a.qcow2"), "qcow2")
    assert result.corruptions > 0 and not result.intact
    assert result.first_error.startswith("ERROR")


def test_leaked_clusters_alone_are_intact(images: Path) -> None:
    result = qemu_img.check(TOOL, leaked_clusters(images / "a.qcow2"), "qcow2")
    assert result.leaks > 0 and result.corruptions == 0 and result.intact


def test_check_of_a_missing_file_quotes_qemu_img(images: Path) -> None:
    with pytest.raises(QemuImgError) as err:
        qemu_img.check(TOOL, images / "nope.qcow2", "qcow2")
    assert "No such file" in err.value.stderr


@pytest.mark.parametrize("thin", [True, False])
@pytest.mark.parametrize("make", [header_only, cut_in_the_data, zeroed_refcounts])
def test_a_damaged_qcow2_is_refused_before_anything_is_made(
    make,  # type: ignore[no-untyped-def]
    thin: bool,
    images: Path,
    dest: Path,
) -> None:
    image = make(images / "broken.qcow2")
    before = sha256(image)
    with pytest.raises(ImageError) as err:
        prepare(image, dest, images, thin=thin, verdicts=IntactImages())
    assert err.value.field == "config.image"
    assert err.value.reason.startswith(f"{image} is a damaged qcow2 image: qemu-img check found")
    assert list(dest.iterdir()) == []
    assert sha256(image) == before  # checked, never repaired


def test_a_damaged_backing_file_is_refused_naming_it(images: Path, dest: Path) -> None:
    base = header_only(images / "base.qcow2")
    top = images / "top.qcow2"
    run(TOOL, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    with pytest.raises(ImageError) as err:
        prepare(top, dest, images, verdicts=IntactImages())
    assert err.value.reason.startswith(f"backing file {base} of {top} is a damaged qcow2 image")
    assert list(dest.iterdir()) == []


def test_an_image_with_leaks_is_used(images: Path, dest: Path) -> None:
    disk = prepare(leaked_clusters(images / "a.qcow2"), dest, images, verdicts=IntactImages())
    assert disk.virtual_size == 64 * MIB


def test_an_unchanged_image_is_checked_once(images: Path, tmp_path: Path) -> None:
    image = whole_qcow2(images / "a.qcow2")
    verdicts = IntactImages()
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        prepare(image, tmp_path / name, images, verdicts=verdicts)
    assert len(verdicts) == 1
    # Damaged in place after the first check: a new version, checked (and refused) again.
    data = image.read_bytes()
    image.write_bytes(data[:512])
    (tmp_path / "three").mkdir()
    with pytest.raises(ImageError):
        prepare(image, tmp_path / "three", images, verdicts=verdicts)


# ---- sharing with running VMs ----------------------------------------------------------------


@pytest.fixture
def held_read_only(images: Path) -> Iterator[Path]:
    """The base image open read-only by another process, as running VMs' overlays hold it."""
    base = make_qcow2(images)
    pid_file, sock = images.parent / "nbd.pid", images.parent / "nbd.sock"
    run(QEMU_NBD, "--fork", "-r", "-f", "qcow2", f"--pid-file={pid_file}", "-k", sock, base)
    pid = int(pid_file.read_text())
    try:
        yield base
    finally:
        os.kill(pid, 15)


@pytest.mark.parametrize("thin", [True, False])
def test_base_in_use_read_only_can_be_shared(thin: bool, held_read_only: Path, dest: Path) -> None:
    disk = prepare(held_read_only, dest, held_read_only.parent, thin=thin)
    assert disk.virtual_size == 64 * MIB


# ---- timing (reported, not asserted) -----------------------------------------------------------


def test_report_overlay_creation_time(images: Path, tmp_path: Path) -> None:
    results = {}
    for size_gib in (1, 20):
        base = images / f"sparse-{size_gib}g.raw"
        subprocess.run(["truncate", "-s", f"{size_gib}G", str(base)], check=True)
        times = []
        for i in range(5):
            out = tmp_path / f"ov-{size_gib}-{i}"
            out.mkdir()
            started = time.perf_counter()
            prepare(base, out, images, thin=True)
            times.append(time.perf_counter() - started)
        results[size_gib] = statistics.median(times)
    print(
        "\nprepare_boot_disk(thin) on a sparse raw base, median of 5: "
        + ", ".join(f"{g} GiB {t * 1000:.1f} ms" for g, t in results.items())
    )


# ---- what is remembered per image version ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_later_overlays_of_an_unchanged_image_need_no_qemu_img(
    fmt: str, images: Path, tmp_path: Path
) -> None:
    """The first start runs qemu-img (info, check, create); the next ones of the same image
    version get the same overlay bytes without it (here qemu-img is /bin/false for them)."""
    image = whole_qcow2(images / "a.qcow2") if fmt == "qcow2" else images / "a.raw"
    if fmt == "raw":
        run(TOOL, "create", "-q", "-f", "raw", image, "64M")
    first, second, fresh = (tmp_path / name for name in ("first", "second", "fresh"))
    for directory in (first, second, fresh):
        directory.mkdir()
    made = prepare(image, first, images, size_mb=128)
    copied = prepare_boot_disk(
        Path("/bin/false"), image, second, thin=True, size_mb=128, allowed_dirs=[str(images)]
    )
    run(TOOL, "create", "-q", "-f", "qcow2", "-b", image, "-F", fmt, fresh / "disk.qcow2", "128M")
    assert copied.path.read_bytes() == made.path.read_bytes() == (fresh / "disk.qcow2").read_bytes()
    assert copied.path.stat().st_mode & 0o777 == 0o600
    assert copied.virtual_size == 128 * MIB and copied.thin
    # A write to the image is a new version: qemu-img is asked again (and here fails).
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    (tmp_path / "third").mkdir()
    with pytest.raises(ImageError):
        prepare_boot_disk(
            Path("/bin/false"),
            image,
            tmp_path / "third",
            thin=True,
            size_mb=128,
            allowed_dirs=[str(images)],
        )

"""`qemu-img check`: its JSON, exit statuses, and the chain check with its remembered verdicts.

A fake qemu-img (a shell script) stands in here; tests/integration/test_qemu_img.py and
tests/integration/test_refused_config.py run the real one on really damaged images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError, ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.file_versions import FileVersion
from nomad_vm.storage.integrity import IntactImages, check_chain
from nomad_vm.storage.qemu_img import CheckResult, ImageInfo, parse_check
from nomad_vm.storage.qemu_img_run import QemuImgError

WHOLE = {"image-end-offset": 262144, "total-clusters": 1024, "check-errors": 0, "format": "qcow2"}
TRUNCATED = {**WHOLE, "corruptions": 3}
TRUNCATED_STDERR = (
    "ERROR: counting reference for region exceeding the end of the file by one cluster or "
    "more: offset 0x30000 size 0x8\nERROR cluster 0 refcount=0 reference=1\n"
)


def fake_qemu_img(tmp_path: Path, stdout: str, status: int, stderr: str = "") -> Path:
    """A qemu-img that prints ``stdout``/``stderr``, exits with ``status`` and logs its argv."""
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    tool = tmp_path / "qemu-img"
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/calls\n'
        f"cat {tmp_path}/out\ncat {tmp_path}/err >&2\nexit {status}\n"
    )
    tool.chmod(0o755)
    return tool


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls"
    return log.read_text().splitlines() if log.exists() else []


def qcow2(path: Path, fmt: str = "qcow2") -> ImageInfo:
    path.write_bytes(b"QFI\xfb" + b"\0" * 508)
    return ImageInfo(path=path, format=fmt, virtual_size=1 << 20, actual_size=512)


# ---- the JSON ------------------------------------------------------------------------------


def test_a_whole_image_has_no_counts() -> None:
    got = parse_check(json.dumps(WHOLE), Path("/i/a.qcow2"))
    assert got == CheckResult(Path("/i/a.qcow2"))
    assert got.intact


def test_corruptions_with_qemu_imgs_first_error_line() -> None:
    got = parse_check(json.dumps(TRUNCATED), Path("/a"), TRUNCATED_STDERR)
    assert (got.corruptions, got.leaks, got.check_errors) == (3, 0, 0)
    assert got.first_error.startswith("ERROR: counting reference for region exceeding the end")
    assert not got.intact


def test_leaks_alone_leave_an_image_intact() -> None:
    got = parse_check(json.dumps({**WHOLE, "leaks": 8}), Path("/a"), "Leaked cluster 5 ...\n")
    assert got.leaks == 8 and got.intact


def test_check_errors_are_not_intact() -> None:
    assert not parse_check(json.dumps({**WHOLE, "check-errors": 1}), Path("/a")).intact


@pytest.mark.parametrize("text", ["", "nope", "[]", '{"corruptions": "3"}', '{"leaks": true}'])
def test_unexpected_check_json_is_a_hypervisor_error(text: str) -> None:
    with pytest.raises(HypervisorError, match="unexpected JSON"):
        parse_check(text, Path("/a"))


# ---- exit statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "report"), [(0, WHOLE), (2, TRUNCATED), (3, {**WHOLE, "leaks": 1})]
)
def test_statuses_with_a_report_are_results(
    tmp_path: Path, status: int, report: dict[str, int]
) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps(report), status)
    result = qemu_img.check(tool, tmp_path / "a.qcow2", "qcow2")
    assert result.corruptions == report.get("corruptions", 0)
    (argv,) = calls(tmp_path)
    assert argv == f"check --output=json --force-share -f qcow2 {tmp_path}/a.qcow2"


def test_status_1_with_a_report_is_a_result_with_check_errors(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps({**WHOLE, "check-errors": 2}), 1, "Check failed\n")
    assert qemu_img.check(tool, tmp_path / "a", "qcow2").check_errors == 2


@pytest.mark.parametrize("status", [1, 63])
def test_no_report_is_a_qemu_img_error_quoting_it(tmp_path: Path, status: int) -> None:
    tool = fake_qemu_img(tmp_path, "", status, "qemu-img: Could not open 'a': No such file\n")
    with pytest.raises(QemuImgError) as err:
        qemu_img.check(tool, tmp_path / "a", "qcow2")
    assert err.value.stderr == "Could not open 'a': No such file"


# ---- the chain and the verdicts ------------------------------------------------------------


def test_a_damaged_top_image_is_refused_naming_the_field(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps(TRUNCATED), 2, TRUNCATED_STDERR)
    top = qcow2(tmp_path / "top.qcow2")
    with pytest.raises(ImageError) as err:
        check_chain(tool, [top], "config.image", IntactImages())
    assert err.value.field == "config.image"
    reason = err.value.reason
    assert reason.startswith(f"{top.path} is a damaged qcow2 image: qemu-img check found 3 ")
    assert "the first: ERROR: counting reference for region exceeding the end" in reason
    assert "replace it with a whole copy" in reason and f"`qemu-img check {top.path}`" in reason


def test_a_damaged_backing_file_is_named_with_its_parent(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps({**WHOLE, "check-errors": 1}), 1)
    top, base = qcow2(tmp_path / "top.qcow2", "raw"), qcow2(tmp_path / "base.qcow2")
    with pytest.raises(ImageError) as err:
        check_chain(tool, [top, base], "config.image", IntactImages())
    assert err.value.reason.startswith(
        f"backing file {base.path} of {top.path} is a damaged qcow2 image: qemu-img check "
        "found 1 part it could not check"
    )


def test_only_qcow2_files_are_checked(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps(WHOLE), 0)
    chain = [qcow2(tmp_path / "a", "raw"), qcow2(tmp_path / "b"), qcow2(tmp_path / "c", "vmdk")]
    check_chain(tool, chain, "config.image", IntactImages())
    assert [argv.split()[-1] for argv in calls(tmp_path)] == [str(tmp_path / "b")]


def test_qemu_img_refusing_to_check_is_an_image_error(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, "", 1, "qemu-img: Could not open: Permission denied\n")
    with pytest.raises(ImageError) as err:
        check_chain(tool, [qcow2(tmp_path / "a")], "config.image", IntactImages())
    assert (
        err.value.reason
        == f"qemu-img cannot check {tmp_path / 'a'}: Could not open: Permission denied"
    )


def test_an_intact_file_is_checked_once_per_version(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps(WHOLE), 0)
    verdicts = IntactImages()
    image = qcow2(tmp_path / "a.qcow2")
    for _ in range(3):
        check_chain(tool, [image], "config.image", verdicts)
    assert len(calls(tmp_path)) == 1
    # Rewritten in place (same inode, same size, new mtime): checked again.
    st = os.stat(image.path)
    os.utime(image.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    check_chain(tool, [image], "config.image", verdicts)
    assert len(calls(tmp_path)) == 2
    # Replaced by another file of the same size under the same name: checked again.
    replacement = tmp_path / "new.qcow2"
    replacement.write_bytes(image.path.read_bytes())
    os.replace(replacement, image.path)
    check_chain(tool, [image], "config.image", verdicts)
    assert len(calls(tmp_path)) == 3


def test_a_damaged_file_is_checked_at_every_start(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, json.dumps(TRUNCATED), 2)
    verdicts = IntactImages()
    for _ in range(2):
        with pytest.raises(ImageError):
            check_chain(tool, [qcow2(tmp_path / "a")], "config.image", verdicts)
    assert len(calls(tmp_path)) == 2 and len(verdicts) == 0


def test_verdicts_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    verdicts = IntactImages(limit=2)
    versions = []
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
        version = FileVersion.of(tmp_path / name)
        assert version is not None
        versions.append(version)
    a, b, c = versions
    verdicts.add(a)
    verdicts.add(b)
    assert a in verdicts  # a is now the most recently used
    verdicts.add(c)
    assert a in verdicts and c in verdicts and b not in verdicts
    assert len(verdicts) == 2

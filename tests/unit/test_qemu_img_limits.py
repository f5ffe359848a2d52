"""qemu-img on a job's image runs under resource limits (CVE-2015-5162): how the limits are set
(util-linux prlimit, before qemu-img starts), how a run that hits one is recognised, and the
error a job gets. A fake qemu-img (a shell script exec'd by the real prlimit) stands in;
tests/integration/test_qemu_img_limits.py runs the real one on crafted images."""

from __future__ import annotations

import json
import re
import resource
import signal
from pathlib import Path

import pytest

from nomad_vm.errors import ImageError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.chain import inspect_chain
from nomad_vm.storage.integrity import IntactImages, check_chain
from nomad_vm.storage.limits import (
    ADDRESS_SPACE_LIMIT,
    CPU_SECONDS_LIMIT,
    MIB,
    USER_IMAGE_LIMITS,
    Limits,
    limit_hit,
)
from nomad_vm.storage.qemu_img import ImageInfo
from nomad_vm.storage.qemu_img_run import QemuImgError, QemuImgLimitExceeded

INFO = {"virtual-size": 1 << 20, "filename": "x", "format": "qcow2", "actual-size": 512}


def fake_qemu_img(tmp_path: Path, script: str) -> Path:
    """A qemu-img that first saves the limits and environment it runs with, then runs
    ``script`` (sh)."""
    tool = tmp_path / "qemu-img"
    tool.write_text(
        "#!/bin/sh\n"
        f"cat /proc/self/limits > {tmp_path}/limits\n"
        f"echo MALLOC_ARENA_MAX=$MALLOC_ARENA_MAX > {tmp_path}/env\n"
        f"{script}\n"
    )
    tool.chmod(0o755)
    return tool


def limits_seen(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """The fake's /proc/self/limits: name -> (soft, hard)."""
    found = {}
    for line in (tmp_path / "limits").read_text().splitlines()[1:]:
        name, soft, hard = re.split(r"\s{2,}", line.strip())[:3]
        found[name] = (soft, hard)
    return found


def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    path.write_bytes(b"QFI\xfb" + b"\0" * 508)
    return path


def test_the_limits_are_in_force_when_qemu_img_starts(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, f"echo '{json.dumps(INFO)}'")
    qemu_img.info(tool, image_file(tmp_path), follow_backing=False)
    seen = limits_seen(tmp_path)
    assert seen["Max address space"] == (str(ADDRESS_SPACE_LIMIT), str(ADDRESS_SPACE_LIMIT))
    assert seen["Max cpu time"] == (str(CPU_SECONDS_LIMIT), str(CPU_SECONDS_LIMIT + 1))
    assert (tmp_path / "env").read_text().strip() == "MALLOC_ARENA_MAX=2"


def test_the_drivers_own_files_run_without_limits(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, "exit 0")
    qemu_img.resize(tool, image_file(tmp_path), "qcow2", 2 * MIB)
    ours = [
        ("unlimited" if v == resource.RLIM_INFINITY else str(v))
        for v in resource.getrlimit(resource.RLIMIT_AS)
    ]
    assert limits_seen(tmp_path)["Max address space"] == tuple(ours)


def test_conversion_gets_cpu_time_for_its_data() -> None:
    assert USER_IMAGE_LIMITS.for_conversion(0) == USER_IMAGE_LIMITS
    more = USER_IMAGE_LIMITS.for_conversion(730 * MIB)
    assert more.cpu_seconds == CPU_SECONDS_LIMIT + 183
    assert more.address_space == ADDRESS_SPACE_LIMIT


@pytest.mark.parametrize(
    ("returncode", "stderr", "hit"),
    [
        (-signal.SIGXCPU, "", "cpu"),
        (
            1,
            "qemu-img: Could not open 'a.vmdk': Could not open 'a.vmdk': Cannot allocate memory",
            "memory",
        ),
        (-signal.SIGABRT, "failed to allocate memory for stack: Cannot allocate memory", "memory"),
        (-signal.SIGABRT, "qemu: qemu_thread_create: Resource temporarily unavailable", "memory"),
        (-signal.SIGABRT, "GLib: ../glib/gmem.c:106: failed to allocate 268435456 bytes", "memory"),
        (1, "qemu-img: Could not open 'a': No such file or directory", None),
        (-signal.SIGKILL, "", None),
        (0, "Cannot allocate memory", None),
    ],
)
def test_which_limit_a_run_hit(returncode: int, stderr: str, hit: str | None) -> None:
    assert limit_hit(returncode, stderr) == hit


def test_out_of_memory_while_reading_is_refused_naming_the_image(tmp_path: Path) -> None:
    tool = fake_qemu_img(
        tmp_path, "echo \"qemu-img: Could not open 'x': Cannot allocate memory\" >&2; exit 1"
    )
    top = image_file(tmp_path)
    with pytest.raises(ImageError) as err:
        inspect_chain(tool, top, [str(tmp_path)], "config.image")
    assert err.value.field == "config.image"
    assert err.value.reason.startswith(
        f"qemu-img needed more than 1024 MiB of memory to read {top}, far more than a real "
        "disk image needs; it may be crafted to exhaust the host"
    )


def test_cpu_time_while_checking_is_refused_naming_the_image(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, "kill -XCPU $$")
    top = ImageInfo(path=image_file(tmp_path), format="qcow2", virtual_size=1, actual_size=1)
    with pytest.raises(ImageError) as err:
        check_chain(tool, [top], "config.image", IntactImages())
    assert err.value.field == "config.image"
    assert err.value.reason.startswith(
        f"qemu-img needed more than 30 s of CPU time to check {top.path}"
    )


def test_limits_are_injectable_and_reported_as_given(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, "kill -XCPU $$")
    small = Limits(address_space=256 * MIB, cpu_seconds=2)
    with pytest.raises(QemuImgLimitExceeded) as err:
        qemu_img.check(tool, image_file(tmp_path), "qcow2", limits=small)
    assert (err.value.resource, err.value.limits) == ("cpu", small)
    seen = limits_seen(tmp_path)
    assert seen["Max address space"] == (str(256 * MIB), str(256 * MIB))
    assert seen["Max cpu time"] == ("2", "3")


def test_a_failure_without_limits_is_not_a_limit(tmp_path: Path) -> None:
    tool = fake_qemu_img(tmp_path, "echo 'Cannot allocate memory' >&2; exit 1")
    with pytest.raises(QemuImgError) as err:
        qemu_img.check(tool, image_file(tmp_path), "qcow2", limits=None)
    assert not isinstance(err.value, QemuImgLimitExceeded)

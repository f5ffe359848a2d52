"""The real qemu-img on images crafted to exhaust it (CVE-2015-5162's kind): under the driver's
limits it fails fast with an error naming the image, and nothing is left (see
tests/integration/crafted_images.py for what the images do without limits; through the real
plugin process: test_refused_config.py)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nomad_vm.errors import ImageError
from nomad_vm.storage.chain import inspect_chain
from nomad_vm.storage.disk import prepare_boot_disk
from nomad_vm.storage.integrity import IntactImages
from nomad_vm.storage.limits import ADDRESS_SPACE_LIMIT, Limits
from tests.integration.crafted_images import memory_bomb, slow_to_convert
from tests.integration.damaged_images import whole_qcow2

pytestmark = pytest.mark.integration

QEMU_IMG = shutil.which("qemu-img")
assert QEMU_IMG, "qemu-img comes from qemu-utils"
TOOL = Path(QEMU_IMG)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_the_memory_bomb_really_is_one(images: Path) -> None:
    """Without limits, ``qemu-img info`` of the 1 KiB image needs more than 1 GiB (measured
    with a limit of 1 GiB: it fails; with 4 GiB: it answers). Guards the test below against
    an image that stopped being a bomb (a QEMU that bounds the directories, say)."""
    bomb = memory_bomb(images / "bomb.vmdk")
    argv = [str(TOOL), "info", "--output=json", "--force-share", str(bomb)]

    def with_limit(space: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["prlimit", f"--as={space}", "--", *argv], capture_output=True, text=True, timeout=60
        )

    assert with_limit(4 * ADDRESS_SPACE_LIMIT).returncode == 0
    starved = with_limit(ADDRESS_SPACE_LIMIT)
    assert starved.returncode != 0 and "Cannot allocate memory" in starved.stderr


def test_an_image_that_needs_gigabytes_to_open_is_refused_naming_it(images: Path) -> None:
    """The driver's default limits (1 GiB): refused while reading the image, in about the time
    qemu-img takes to fail an allocation, not after it took the host's memory."""
    bomb = memory_bomb(images / "bomb.vmdk")
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        inspect_chain(TOOL, bomb, [str(images)], "config.image")
    assert time.monotonic() - started < 10
    assert err.value.field == "config.image"
    assert err.value.reason.startswith(
        f"qemu-img needed more than 1024 MiB of memory to read {bomb}, far more than a real "
        "disk image needs; it may be crafted to exhaust the host (see CVE-2015-5162)"
    )


def test_a_vmdk_with_extents_it_names_relatively_is_refused_without_reading_them(
    images: Path,
) -> None:
    """Read through its descriptor, a vmdk's relative extent names mean nothing to qemu-img:
    such an image is refused as a multi-file vmdk, naming the field and what to do."""
    bomb = memory_bomb(images / "bomb.vmdk", absolute=False)
    with pytest.raises(ImageError) as err:
        inspect_chain(TOOL, bomb, [str(images)], "config.image")
    assert err.value.field == "config.image"
    assert "separate extent files" in err.value.reason
    assert "qemu-img convert -O qcow2" in err.value.reason


def test_a_conversion_that_spins_is_stopped_by_its_cpu_limit(images: Path, tmp_path: Path) -> None:
    """Injected limits low enough to trip: 1 s of CPU (plus 1 s for its 1 KiB of data) for a
    conversion that would take minutes. Refused naming the image; the half-made disk is gone."""
    slow = slow_to_convert(images / "slow.vmdk")
    dest = tmp_path / "task"
    dest.mkdir()
    low = Limits(address_space=ADDRESS_SPACE_LIMIT, cpu_seconds=1)
    cpu_before = children_cpu()
    with pytest.raises(ImageError) as err:
        prepare_boot_disk(
            TOOL,
            slow,
            dest,
            thin=True,
            size_mb=None,
            allowed_dirs=[str(images)],
            verdicts=IntactImages(),
            limits=low,
        )
    assert children_cpu() - cpu_before < 10
    assert err.value.field == "config.image"
    assert err.value.reason.startswith(
        f"qemu-img needed more than 2 s of CPU time to convert {slow}"
    ), err.value.reason
    assert list(dest.iterdir()) == []


def test_real_images_pass_under_the_default_limits(images: Path, tmp_path: Path) -> None:
    """The other side: a qcow2 (info, check, overlay) and a vmdk (converted) are prepared under
    the same limits as ever."""
    base = whole_qcow2(images / "base.qcow2")
    vmdk = images / "base.vmdk"
    subprocess.run(
        [str(TOOL), "convert", "-q", "-f", "qcow2", "-O", "vmdk", str(base), str(vmdk)],
        check=True,
        timeout=60,
    )
    for n, image in enumerate((base, vmdk)):
        dest = tmp_path / f"task{n}"
        dest.mkdir()
        disk = prepare_boot_disk(
            TOOL,
            image,
            dest,
            thin=True,
            size_mb=128,
            allowed_dirs=[str(images)],
            verdicts=IntactImages(),
        )
        assert disk.virtual_size == 128 * 1024 * 1024

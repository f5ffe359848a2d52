"""What the plugin hands an unprivileged Cloud Hypervisor (vm/cloud_hypervisor/vmm_files.py),
with real files and the real vm_user: the task's own files become vm_user's, the overlay's
header names its base by the descriptor CH inherits, and what vm_user could not open, or CH
would open by a name we cannot vouch for, is refused before launch, naming why."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from nomad_vm.errors import LaunchError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.held import FileHolder, open_own
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.cloud_hypervisor.vmm_files import hand_over, make_vmm_dir
from nomad_vm.vm.handover import handover
from nomad_vm.vm.request import LaunchDevices
from nomad_vm.vm.spec import DiskSpec
from nomad_vm.vm.vmm_user import VMMUser, resolve_vmm_user

MIB = 2**20


@pytest.fixture
def user() -> VMMUser:
    found = resolve_vmm_user("nomad-vm")
    assert found is not None, "the tests run as root, with the vm_user `make setup` creates"
    return found


def _image(path: Path, backing: Path | None = None) -> Path:
    if backing is None:
        qemu_img.create(find_qemu_img(), path, "qcow2", MIB, falloc=False)
    else:
        qemu_img.create_overlay(find_qemu_img(), backing, "qcow2", path, MIB)
    return path


def _backing_name(path: Path) -> str:
    info = subprocess.run(
        [str(find_qemu_img()), "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return str(json.loads(info)["backing-filename"])


def test_the_tasks_files_become_vm_users_and_the_overlay_names_its_base_by_descriptor(
    short_tmp: Path, user: VMMUser
) -> None:
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    base = _image(short_tmp / "base.qcow2")
    base.chmod(0o644)
    overlay = _image(runtime / "disk.qcow2", backing=base)
    seed = runtime / "cidata.iso"
    seed.write_bytes(b"\0" * 2048)
    seed.chmod(0o600)
    with FileHolder() as holder, handover() as handed:
        base_held = open_own(base, holder, writable=False)
        disk = DiskSpec(open_own(overlay, holder, writable=True), "qcow2", ((base_held, "qcow2"),))
        devices = LaunchDevices(1, disk, open_own(seed, holder, writable=False))
        vmm_dir = make_vmm_dir(runtime, user)
        files = hand_over(runtime, devices, None, user, handed, holder)
        for own in (overlay, seed):
            st = own.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o600), own
        assert _backing_name(overlay) == base_held.proc_path
        assert base.stat().st_uid == 0  # the job's image is left as it is
        assert {files.api_fd, files.events_fd, disk.file.fd, base_held.fd} <= set(files.fds)
        assert stat.S_ISSOCK(os.fstat(files.api_fd).st_mode)
        assert stat.S_IMODE((runtime / "ch-events.json").stat().st_mode) == 0o600
        assert (vmm_dir.stat().st_uid, stat.S_IMODE(vmm_dir.stat().st_mode)) == (user.uid, 0o700)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700 and runtime.stat().st_uid == 0


def test_a_base_with_a_backing_file_of_its_own_is_refused(short_tmp: Path, user: VMMUser) -> None:
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    bottom = _image(short_tmp / "bottom.qcow2")
    middle = _image(short_tmp / "middle.qcow2", backing=bottom)
    overlay = _image(runtime / "disk.qcow2", backing=middle)
    with FileHolder() as holder, handover() as handed:
        chain = tuple((open_own(p, holder, writable=False), "qcow2") for p in (middle, bottom))
        disk = DiskSpec(open_own(overlay, holder, writable=True), "qcow2", chain)
        with pytest.raises(LaunchError, match=r"backing file of its own.*flatten"):
            hand_over(runtime, LaunchDevices(1, disk), None, user, handed, holder)
    assert _backing_name(overlay) == str(middle)  # untouched


def test_a_firmware_vm_user_cannot_read_is_refused_naming_it(
    short_tmp: Path, user: VMMUser
) -> None:
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    firmware = short_tmp / "CLOUDHV.fd"
    firmware.write_bytes(b"\0" * 4096)
    firmware.chmod(0o600)
    with FileHolder() as holder, handover() as handed:
        with pytest.raises(LaunchError) as refused:
            hand_over(runtime, LaunchDevices(1), firmware, user, handed, holder)
        assert f"vm_user nomad-vm may not read {firmware}" in str(refused.value)
        firmware.chmod(0o644)
        files = hand_over(runtime, LaunchDevices(1), firmware, user, handed, holder)
        assert files.firmware is not None and files.firmware.startswith("/proc/self/fd/")
        assert os.readlink(f"/proc/self/fd/{files.firmware.rsplit('/', 1)[1]}") == str(firmware)

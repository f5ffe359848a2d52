"""What Cloud Hypervisor, running as the unprivileged ``vm_user``, is given, and how it names it.

CH runs as ``vm_user`` with no_new_privs (``vmm_user``), like QEMU, and the task's runtime
directory stays root's (0700), so CH can neither create nor look up anything in it by name:

* its API socket is bound by the plugin and handed over (``--api-socket fd=N``); its event
  monitor is a file the plugin created, handed over opened for writing
  (``--event-monitor fd=N``); its messages go to its stderr, a descriptor too;
* the files CH opens itself by name (CH takes no descriptor for a disk or a payload) are given
  as ``/proc/self/fd/N`` of a descriptor it inherits. Opening that magic link resolves no
  path: only the inode's own permission bits are checked. So the task's own disk and seed
  (files the plugin made for this VM only) are chowned to ``vm_user`` (mode 0600 stays); the
  job's kernel and initramfs are already descriptors CH may reopen (world-readable, or a
  sealed copy); the operator's firmware must be readable by ``vm_user``;
* a qcow2 overlay records its base by name, and CH follows that name itself: the overlay's
  header is rewritten to ``/proc/self/fd/N`` of the base the plugin checked, so CH reads that
  very inode, never what is at the image's path by then (the same guarantee QEMU gets from
  explicit backing nodes). A base with a backing file of its own would be followed by the
  name in *its* header, which we cannot rewrite, so such chains are refused;
* what CH must reach by path in a directory (each virtiofsd's vhost-user socket, which the
  plugin binds; the vsock socket CH binds) lives in ``<runtime dir>/vmm``, a directory owned
  by ``vm_user`` (0700) that is CH's working directory: CH names them relatively, so no
  ancestor of it needs to be searchable by ``vm_user``;
* a TAP is opened by name (``vm.create`` takes no descriptors): the plugin makes ``vm_user`` its
  owner (TUNSETOWNER), which lets an unprivileged process attach to it (given /dev/net/tun is
  open to it, as on Debian: mode 666); it is already up. The plugin then lets go of its own
  descriptor (``let_go_of_taps``), since a single-queue TAP takes one attached file.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError, LaunchError
from nomad_vm.storage import qemu_img
from nomad_vm.storage.held import FileHolder, HeldFile, open_own
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.cloud_hypervisor.files import API_SOCKET, EVENTS_FILE, VMM_DIR
from nomad_vm.vm.handover import Handover
from nomad_vm.vm.request import LaunchDevices
from nomad_vm.vm.spec import NicSpec
from nomad_vm.vm.vmm_user import VMMUser, may_open

# ioctl(tap_fd, TUNSETOWNER, uid): the user that may attach to a persistent TAP unprivileged.
TUNSETOWNER = 0x400454CC
# What CH opens to attach to a TAP by name (Debian makes it 0666; some containers do not).
TUN_DEVICE = Path("/dev/net/tun")


@dataclass(frozen=True)
class VmmFiles:
    """The descriptors CH inherits and the names it is given for what it opens itself."""

    api_fd: int
    events_fd: int
    # Every descriptor CH inherits (under the same numbers).
    fds: tuple[int, ...]
    # ``/proc/self/fd/N`` of the firmware that boots the disk, when there is one.
    firmware: str | None = None


def vmm_dir(runtime_dir: Path) -> Path:
    return runtime_dir / VMM_DIR


def make_vmm_dir(runtime_dir: Path, user: VMMUser | None) -> Path:
    """CH's working directory: ``vm_user``'s alone (it binds its vsock socket there)."""
    path = vmm_dir(runtime_dir)
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
    except OSError as exc:
        raise LaunchError(f"cannot prepare {path} for Cloud Hypervisor: {exc.strerror}") from exc
    return path


def hand_over(
    runtime_dir: Path,
    devices: LaunchDevices,
    firmware: Path | None,
    user: VMMUser | None,
    handed: Handover,
    holder: FileHolder,
) -> VmmFiles:
    """Everything CH gets from the plugin; descriptors registered with ``handed`` and
    ``holder`` (closed by their owners once CH holds its copies). LaunchError naming
    ``vm_user`` when that user could not open a file it must."""
    api_fd = handed.listen(runtime_dir / API_SOCKET)
    events_fd = handed.output_file(runtime_dir / EVENTS_FILE)
    inherited: list[int] = [api_fd, events_fd]
    if devices.disk is not None:
        disk_file = devices.disk.held
        _give(disk_file, runtime_dir, user, write=disk_file.writable)
        inherited.append(disk_file.fd)
        if devices.disk.backing:
            inherited.append(_point_overlay_at_its_base(devices, user))
    if devices.seed is not None:
        _give(devices.seed, runtime_dir, user, write=False)
        inherited.append(devices.seed.fd)
    for boot_file in (devices.kernel, devices.initramfs):
        if boot_file is not None:
            _check(boot_file, user, write=False)
            inherited.append(boot_file.fd)
    firmware_name = None
    if firmware is not None:
        held = _open_firmware(firmware, holder)
        _check(held, user, write=False)
        inherited.append(held.fd)
        firmware_name = held.proc_path
    if user is not None and devices.nics:
        _check_tun(user)
        for nic in devices.nics:
            if nic.fd is not None:
                _own_tap(nic.fd, nic.tap, user)
    return VmmFiles(api_fd, events_fd, tuple(inherited), firmware_name)


def give_sockets(paths: list[Path], user: VMMUser | None) -> None:
    """Sockets the plugin bound for CH to connect to (virtiofsd's): connecting needs write
    permission on the socket, so they become ``vm_user``'s."""
    if user is None:
        return
    for path in paths:
        try:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
        except OSError as exc:
            raise LaunchError(f"cannot hand {path} to {user.name}: {exc.strerror}") from exc


def _give(held: HeldFile, runtime_dir: Path, user: VMMUser | None, *, write: bool) -> None:
    """A file of the task's runtime dir (made for this VM alone) becomes ``user``'s, and
    only ``user``'s (0600: a seed may hold a password hash and the task's environment)."""
    if user is None:
        return
    if held.path.parent == runtime_dir:
        try:
            os.fchown(held.fd, user.uid, user.gid)
            os.fchmod(held.fd, 0o600)
        except OSError as exc:
            raise LaunchError(f"cannot hand {held.path} to {user.name}: {exc.strerror}") from exc
    _check(held, user, write=write)


def _check(held: HeldFile, user: VMMUser | None, *, write: bool) -> None:
    if user is None or may_open(user, held.fstat(), write=write):
        return
    what = "read and write" if write else "read"
    raise LaunchError(
        f"vm_user {user.name} may not {what} {held.path}, which Cloud Hypervisor opens "
        "itself: make it readable by that user (or by everyone)"
    )


def _point_overlay_at_its_base(devices: LaunchDevices, user: VMMUser | None) -> int:
    disk = devices.disk
    assert disk is not None
    if len(disk.backing) > 1:
        raise LaunchError(
            f"the image behind {disk.path} has a backing file of its own; Cloud Hypervisor "
            "would open that one by the name in the image, so flatten the image first "
            "(qemu-img convert) or use the qemu backend"
        )
    base, base_format = disk.backing[0]
    _check(base, user, write=False)
    try:
        qemu_img.set_backing_name(find_qemu_img(), disk.path, base.proc_path, base_format)
    except HypervisorError as exc:
        raise LaunchError(
            f"cannot point {disk.path} at its base for Cloud Hypervisor: {exc}"
        ) from exc
    return base.fd


def _open_firmware(firmware: Path, holder: FileHolder) -> HeldFile:
    try:
        # The operator's file (Debian-style installs may symlink it): trusted as configured.
        return open_own(firmware, holder, writable=False, follow_symlinks=True)
    except OSError as exc:
        raise LaunchError(
            f"cannot open cloud_hypervisor.firmware {firmware}: {exc.strerror}"
        ) from exc


def let_go_of_taps(nics: Sequence[NicSpec]) -> None:
    """Detach the plugin from each TAP before CH attaches to it by name: a single-queue TAP
    takes one attached file, so ours would make CH's TUNSETIFF fail with EBUSY. The driver
    owns the descriptor's number (it closes it after the launch), so /dev/null is put on that
    number (dup2 closes the TAP's file atomically) and the driver closes that instead."""
    with_fds = [nic.fd for nic in nics if nic.fd is not None]
    if not with_fds:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in with_fds:
            os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _check_tun(user: VMMUser) -> None:
    try:
        st = TUN_DEVICE.stat()
    except OSError as exc:
        raise LaunchError(f"cannot check {TUN_DEVICE} for {user.name}: {exc.strerror}") from exc
    if not may_open(user, st, write=True):
        raise LaunchError(
            f"vm_user {user.name} may not open {TUN_DEVICE} (mode {st.st_mode & 0o777:o}), "
            "which Cloud Hypervisor opens to attach to the task's TAP by name (its vm.create "
            f"takes no TAP descriptors); make it mode 666 (Debian's default), or set "
            'vm_user = "root" to run Cloud Hypervisor as root (unsafe)'
        )


def _own_tap(fd: int, name: str, user: VMMUser) -> None:
    try:
        fcntl.ioctl(fd, TUNSETOWNER, user.uid)
    except OSError as exc:
        raise LaunchError(f"cannot let {user.name} attach to TAP {name}: {exc.strerror}") from exc

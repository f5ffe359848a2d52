"""Who a VM's processes run as: an unprivileged system user, not the plugin's root.

The plugin runs as root (it makes TAPs, nftables rules, bridges); the VMM and its helpers
(QEMU, virtiofsd) need none of that once the plugin has prepared their files, sockets and TAP
and handed them over as descriptors. So they run as ``vm_user`` (default ``nomad-vm``, created
by ``make setup`` and ``nomad-vm install``) with no supplementary groups but the user's own
(``kvm`` on a host where the VMM uses /dev/kvm). ``vm_user = "root"`` keeps the old behaviour:
documented as unsafe, for hosts where the operator has a reason.

A plugin that is not root cannot switch users; its VMs run as the plugin's own user, which is
already unprivileged.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from nomad_vm.errors import VMRequestError

OPTION = "vm_user"
ROOT = "root"
CREATE_HINT = (
    "create it with `useradd --system --no-create-home --home-dir /nonexistent "
    "--shell /usr/sbin/nologin {name}` (`nomad-vm install` and `make setup` do), "
    'or set vm_user = "root" to run VMs as root (unsafe)'
)


@dataclass(frozen=True)
class VMMUser:
    """The account a VMM process runs as, with the groups it keeps."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    setpriv: str = "setpriv"

    def switch_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this user: setpriv sets the ids and groups, forbids gaining
        privileges through setuid files (no_new_privs), then execs it (same pid)."""
        groups = ",".join(str(g) for g in self.groups if g != self.gid)
        return [
            self.setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def describe(self) -> str:
        names = ", ".join(_group_name(g) for g in self.groups) or "none"
        return f"{self.name} (uid {self.uid}, groups {names})"


def resolve_vmm_user(name: str) -> VMMUser | None:
    """The user VMMs run as; None when they run as the plugin itself (the plugin is not root,
    or the operator chose root). VMRequestError naming ``vm_user`` for an unknown account."""
    if os.geteuid() != 0 or name == ROOT:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        reason = f"there is no user {name!r} on this host; " + CREATE_HINT.format(name=name)
        raise VMRequestError(OPTION, reason) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise VMRequestError(
            OPTION,
            f"user {name!r} has uid or gid 0, which is root's; name an unprivileged user, "
            'or write vm_user = "root" to mean root',
        )
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != 0)
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        raise VMRequestError(OPTION, "setpriv is not installed (Debian package util-linux)")
    return VMMUser(name, entry.pw_uid, entry.pw_gid, groups, setpriv)


def runs_as(user: VMMUser | None) -> str:
    """For fingerprints and docs: who the VMMs run as."""
    if user is not None:
        return user.name
    return pwd.getpwuid(os.geteuid()).pw_name


KVM_DEVICE = "/dev/kvm"


def check_kvm_access(user: VMMUser | None, device: str = KVM_DEVICE) -> None:
    """VMRequestError naming ``vm_user`` when ``user`` could not open the KVM device for
    reading and writing (its owner, one of its groups, or everyone must have rw)."""
    if user is None:
        return
    try:
        st = os.stat(device)
    except OSError as exc:
        raise VMRequestError(OPTION, f"cannot check {device} for {user.name}: {exc}") from exc
    if not may_open(user, st, write=True):
        group = _group_name(st.st_gid)
        raise VMRequestError(
            OPTION,
            f"{user.name} cannot open {device} (owner uid {st.st_uid}, group {group}, mode "
            f"{st.st_mode & 0o777:o}), so the VMM could not use KVM; add it to that group "
            f"(`usermod -aG {group} {user.name}`) or use the TCG accelerator",
        )


def may_open(user: VMMUser, st: os.stat_result, *, write: bool) -> bool:
    """Would ``user`` be allowed to open a file with this status for reading (and writing)?
    The owner's, its groups' or everyone's bits, as the kernel checks them (no ACLs here)."""
    wanted = 0o6 if write else 0o4
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid in (user.gid, *user.groups):
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & wanted == wanted


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

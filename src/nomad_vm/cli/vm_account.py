"""The unprivileged account QEMU and virtiofsd run as (the plugin's ``vm_user``), created the
way a Debian package would create a system user: no home, no login shell. On a host with
``/dev/kvm`` it joins the device's group, so QEMU can use KVM without being root."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

from nomad_vm.vm.vmm_user import KVM_DEVICE

DEFAULT_VM_USER = "nomad-vm"


class AccountError(Exception):
    """The account could not be created or changed (the message says why)."""


def ensure_vm_user(name: str = DEFAULT_VM_USER, kvm_device: str = KVM_DEVICE) -> list[str]:
    """Create ``name`` if missing and add it to /dev/kvm's group; returns what was done (empty
    when nothing needed doing). Needs root."""
    done: list[str] = []
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--user-group", name,
        )  # fmt: skip
        done.append(f"created system user {name}")
    group = _kvm_group(kvm_device)
    if group is not None and group.gr_gid not in os.getgrouplist(name, pwd.getpwnam(name).pw_gid):
        _run("usermod", "--append", "--groups", group.gr_name, name)
        done.append(f"added {name} to group {group.gr_name} ({kvm_device})")
    return done


def _kvm_group(device: str) -> grp.struct_group | None:
    try:
        gid = os.stat(device).st_gid
    except OSError:
        return None
    if gid == 0:
        return None  # root's group: joining it would give far more than KVM
    try:
        return grp.getgrgid(gid)
    except KeyError:
        return None


def _run(*argv: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise AccountError(f"{argv[0]} is not installed (Debian package passwd)") from exc
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip()
        raise AccountError(f"`{' '.join(argv)}` failed: {said}") from exc

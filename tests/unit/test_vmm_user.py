"""Who VMs run as: resolving vm_user, the setpriv command line, KVM access for that user."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from nomad_vm.errors import VMRequestError
from nomad_vm.vm.vmm_user import VMMUser, check_kvm_access, resolve_vmm_user

USER = VMMUser("nomad-vm", 995, 995, (995, 36), "/usr/bin/setpriv")


def test_switch_argv_sets_ids_groups_and_no_new_privs() -> None:
    assert USER.switch_argv(["qemu", "-m", "1"]) == [
        "/usr/bin/setpriv",
        "--reuid=995",
        "--regid=995",
        "--groups=36",
        "--no-new-privs",
        "--",
        "qemu",
        "-m",
        "1",
    ]
    alone = VMMUser("u", 5, 5, (5,), "setpriv")
    assert "--clear-groups" in alone.switch_argv(["x"])


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root plugin cannot switch users at all")
def test_an_unknown_user_is_an_error_naming_vm_user_and_how_to_create_it() -> None:
    with pytest.raises(VMRequestError) as err:
        resolve_vmm_user("no-such-user-nv")
    assert err.value.option == "vm_user"
    assert "useradd --system" in err.value.reason


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root plugin cannot switch users at all")
def test_root_by_name_or_uid_0_means_root() -> None:
    assert resolve_vmm_user("root") is None
    # Another name for uid 0 is refused rather than taken as unprivileged.
    zero = [e.pw_name for e in pwd.getpwall() if e.pw_uid == 0 and e.pw_name != "root"]
    for name in zero:
        with pytest.raises(VMRequestError, match="uid or gid 0"):
            resolve_vmm_user(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize(
    ("owner", "group", "mode", "allowed"),
    [
        (0, 0, 0o600, False),  # root-only device: the user cannot open it
        (0, 36, 0o660, True),  # the user's group (kvm)
        (0, 36, 0o600, False),
        (0, 0, 0o666, True),  # everyone
        (995, 0, 0o600, True),  # owned by the user
    ],
)
def test_kvm_access_follows_owner_group_and_mode(
    tmp_path: Path, owner: int, group: int, mode: int, allowed: bool
) -> None:
    device = tmp_path / "kvm"
    device.touch()
    os.chown(device, owner, group)
    device.chmod(mode)
    if allowed:
        check_kvm_access(USER, str(device))
    else:
        with pytest.raises(VMRequestError, match="usermod -aG") as err:
            check_kvm_access(USER, str(device))
        assert err.value.option == "vm_user"


def test_a_plugin_running_vms_as_itself_needs_no_check(tmp_path: Path) -> None:
    check_kvm_access(None, str(tmp_path / "missing"))

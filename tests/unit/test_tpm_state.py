"""The TPM's state directory in the task dir: made 0700 for the VMM's user, reused across
starts, and refused when another tenant of the allocation planted something there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nomad_vm.driver.tpm_state import TPM_STATE_DIR, open_tpm_state
from nomad_vm.errors import HypervisorError
from nomad_vm.vm.vmm_user import VMMUser

OWNER = VMMUser("vm", 4242, 4243, (4243,))


def test_made_owned_by_the_vmm_user_and_reused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = tmp_path / TPM_STATE_DIR
    fd = open_tpm_state(path, OWNER)
    try:
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4243, 0o700)
        assert os.path.samestat(st, path.stat())
    finally:
        os.close(fd)
    (path / "tpm2-00.permall").write_bytes(b"state")
    fd = open_tpm_state(path, OWNER)  # a restart in the same allocation finds it
    os.close(fd)
    assert (path / "tpm2-00.permall").read_bytes() == b"state"


def test_a_symlink_or_a_strangers_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    path = tmp_path / TPM_STATE_DIR
    path.symlink_to(target)
    with pytest.raises(HypervisorError):
        open_tpm_state(path, OWNER)
    path.unlink()
    path.mkdir()
    os.chown(path, 5555, 5555)
    with pytest.raises(HypervisorError) as err:
        open_tpm_state(path, OWNER)
    assert "uid 5555" in str(err.value)
    assert path.stat().st_uid == 5555  # left as it was

"""The KVM probe, for real, on this host.

It must give an answer with a concrete reason whatever the host has. Where the operator knows
the answer (this project's development host has a paravirtual nested KVM that cannot run
ordinary guests at hardware speed), NOMAD_VM_EXPECT_KVM=unusable or =usable pins it.
"""

from __future__ import annotations

import os
import time

import pytest

from nomad_vm.vm.accel import KvmStatus, choose_accelerator, clear_kvm_probe_cache, probe_kvm
from nomad_vm.vm.kvm_probe import KVM_DEVICE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def probed() -> KvmStatus:
    clear_kvm_probe_cache()
    started = time.perf_counter()
    status = probe_kvm()
    elapsed = time.perf_counter() - started
    print(f"\nprobe_kvm() -> {status} in {elapsed:.3f} s")
    return status


def test_probe_gives_a_reasoned_answer(probed: KvmStatus) -> None:
    assert isinstance(probed, KvmStatus)
    assert isinstance(probed.usable, bool)
    assert probed.reason.strip()


def test_probe_agrees_with_the_host(probed: KvmStatus) -> None:
    expected = os.environ.get("NOMAD_VM_EXPECT_KVM", "")
    if expected == "unusable":
        assert probed.usable is False
    elif expected == "usable":
        assert probed.usable is True
    if not os.path.exists(KVM_DEVICE):
        assert probed.usable is False
        assert "does not exist" in probed.reason


def test_auto_picks_tcg_when_kvm_is_unusable(probed: KvmStatus) -> None:
    choice = choose_accelerator("auto", probed)
    assert choice.name == ("kvm" if probed.usable else "tcg")
    if not probed.usable:
        assert choice.reason.startswith("KVM not usable: ")
        assert probed.reason in choice.reason


def test_result_is_cached_per_process(probed: KvmStatus) -> None:
    started = time.perf_counter()
    again = probe_kvm()
    assert again is probed
    assert time.perf_counter() - started < 0.01

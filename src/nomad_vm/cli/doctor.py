"""`nomad-vm doctor`: is this host ready to run VM tasks? Prints one line per check."""

from __future__ import annotations

from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.vm.accel import choose_accelerator, probe_kvm
from nomad_vm.vm.qemu.binary import find_qemu, find_qemu_img, qemu_version


def run_doctor(qemu_binary: str, accelerator: str) -> int:
    failures = 0
    try:
        binary = find_qemu(qemu_binary)
        print(f"ok    QEMU {qemu_version(binary)} at {binary}")
    except HypervisorError as exc:
        print(f"FAIL  {exc}")
        failures += 1
    try:
        print(f"ok    qemu-img at {find_qemu_img()}")
    except HypervisorError as exc:
        print(f"warn  {exc} (needed for disk images)")
    kvm = probe_kvm()
    print(
        f"{'ok  ' if kvm.usable else 'info'}  KVM {'usable' if kvm.usable else 'not usable'}: "
        f"{kvm.reason}"
    )
    try:
        accel = choose_accelerator(accelerator, kvm)
        print(f"ok    accelerator {accelerator!r} -> {accel.name}: {accel.reason}")
    except ConfigError as exc:
        print(f"FAIL  {exc}")
        failures += 1
    print("host is ready" if not failures else f"{failures} problem(s) found")
    return 1 if failures else 0

"""Machine type and boot firmware: which combinations QEMU can boot, and their argv fragment.

What QEMU (7.2) and OVMF can and cannot do, as enforced by ``validate_machine``:

* ``microvm`` has no flash device and no disk-booting firmware (qboot only jumps into a kernel
  given with ``-kernel``): BIOS only, and only with a kernel.
* ``uefi-secure`` uses OVMF's SMM build, whose variable store is only writable from SMM so the
  guest OS cannot replace the Secure Boot keys. OVMF's SMM support is for q35 only.
* ``q35`` otherwise runs with ``smm=off``: docs/test-guests.md saw QMP ``system_powerdown`` not
  reach a q35 guest under TCG with SMM on. (Re-measured for this module: the tiny guest did power
  off with SMM on too, with SeaBIOS and with OVMF; off is kept because nothing else needs SMM.)

The argv fragment leaves ``-accel`` to the caller (qemu/argv.py decides KVM or TCG).
"""

from __future__ import annotations

from dataclasses import dataclass

from nomad_vm.errors import VMRequestError
from nomad_vm.vm.firmware import BIOS, FIRMWARE_KINDS, UEFI_SECURE, FirmwarePlan

# What QEMU's backend supports (its capabilities); schema/ declares the allowed values and
# defaults of the task config, of which these are the QEMU subset.
ARCHES = ("x86_64",)
MACHINE_TYPES = ("pc", "q35", "microvm")

# Tells QEMU's pflash device that only SMM code may write the variable store; OVMF's SMM build
# checks for this and refuses to run without it.
SECURE_PFLASH = "driver=cfi.pflash01,property=secure,value=on"
# The block nodes of the UEFI code and variable store (defined by qemu/files_argv.py).
FLASH_NODES = ("fw-code", "fw-vars")


@dataclass(frozen=True)
class MachineConfig:
    machine: str  # a QEMU machine type: pc, q35 or microvm
    firmware: str  # bios, uefi or uefi-secure
    # smm=on|off on the command line; None leaves QEMU's default for the machine type.
    smm: bool | None


def validate_machine(
    arch: str, machine: str, firmware: str, has_kernel: bool, has_disk: bool
) -> MachineConfig:
    """Check a VM's platform choice.

    Raises VMRequestError naming the request's option to change (``arch``, ``machine``,
    ``firmware``, ``kernel``).
    """
    if arch not in ARCHES:
        raise VMRequestError("arch", f"unsupported architecture {arch!r}; use x86_64")
    if firmware not in FIRMWARE_KINDS:
        raise VMRequestError(
            "firmware", f"unknown firmware {firmware!r}; use {_either(FIRMWARE_KINDS)}"
        )
    if machine not in MACHINE_TYPES:
        raise VMRequestError(
            "machine", f"unknown machine type {machine!r}; use {_either(MACHINE_TYPES)}"
        )
    if not has_kernel and not has_disk:
        raise VMRequestError("kernel", "nothing to boot: set kernel, or give the task a disk")
    if machine == "microvm":
        _check_microvm(firmware, has_kernel)
    if firmware == UEFI_SECURE and machine != "q35":
        raise VMRequestError(
            "firmware",
            f'uefi-secure needs os {{ machine = "q35" }}, not {machine!r}: Secure Boot needs '
            "SMM-protected firmware (OVMF's secure build), which QEMU provides only on q35",
        )
    smm = firmware == UEFI_SECURE if machine == "q35" else None
    return MachineConfig(machine=machine, firmware=firmware, smm=smm)


def _check_microvm(firmware: str, has_kernel: bool) -> None:
    if firmware != BIOS:
        raise VMRequestError(
            "firmware",
            f"{firmware} is not available on microvm (no flash for UEFI firmware); use "
            'firmware = "bios", or os { machine = "pc" } or "q35"',
        )
    if not has_kernel:
        raise VMRequestError(
            "machine",
            "microvm only boots a kernel given directly (config.kernel); its firmware cannot "
            'boot from a disk: set kernel, or use os { machine = "pc" } or "q35"',
        )


def machine_argv(
    cfg: MachineConfig,
    plan: FirmwarePlan | None,
    memory_backend: str | None = None,
    mem_merge: bool = False,
) -> list[str]:
    """``-machine`` (for UEFI with its flash on the block nodes ``FLASH_NODES``, which the
    caller defines: ``qemu.files_argv.firmware_argv``). A pure function.

    ``plan`` must be given exactly when the firmware is UEFI; a mismatch is a programming error
    (ValueError). ``memory_backend`` names an ``-object memory-backend-*`` to use as the
    guest's RAM. ``mem_merge`` marks the guest's RAM mergeable for KSM (``mem-merge=on``).
    """
    machine = cfg.machine if cfg.smm is None else f"{cfg.machine},smm={'on' if cfg.smm else 'off'}"
    if memory_backend:
        machine += f",memory-backend={memory_backend}"
    if mem_merge:
        machine += ",mem-merge=on"
    if cfg.firmware == BIOS:
        if plan is not None:
            raise ValueError("BIOS boot takes no firmware plan")
        return ["-machine", machine]
    if plan is None:
        raise ValueError(f"{cfg.firmware} needs a firmware plan")
    if plan.kind != cfg.firmware:
        raise ValueError(f"firmware plan is for {plan.kind}, machine config for {cfg.firmware}")
    code_node, vars_node = FLASH_NODES
    argv = ["-machine", f"{machine},pflash0={code_node},pflash1={vars_node}"]
    if plan.requires_smm:
        if not cfg.smm:
            raise ValueError(f"{plan.code} requires SMM, but the machine config has it off")
        argv += ["-global", SECURE_PFLASH]
    return argv


def option_value(path: object) -> str:
    """A path inside a QEMU key=value list, where a comma ends the value unless doubled."""
    return str(path).replace(",", ",,")


def _either(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]

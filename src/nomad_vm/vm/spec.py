"""A hypervisor-neutral description of one VM; each backend turns it into its own command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VMSpec:
    name: str
    vcpus: int
    memory_mb: int
    kernel: Path
    initramfs: Path | None
    cmdline: str
    # "kvm" or "tcg", decided by nomad_vm.vm.accel before the spec is built.
    accelerator: str
    # Control socket of the VMM (QMP for QEMU).
    control_socket: Path


@dataclass(frozen=True)
class VMExit:
    """How a VMM process ended. ``code`` is None when it was killed by ``signal``."""

    code: int | None
    signal: int | None
    reason: str

    @property
    def clean(self) -> bool:
        return self.code == 0 and not self.signal
